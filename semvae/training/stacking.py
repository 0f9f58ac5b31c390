"""Several VAE trainings in one process as one optimiser step (``hydra/launcher=stacked``).

Each member is an ordinary run: its task function runs unchanged in a thread of its own, with its own Trainer,
callbacks, run folder, checkpoints, W&B run and evaluation. The threads never run at the same time. A member runs
its set-up until it would train (``fit``: the task's Trainer is ready, the checkpoint to continue from is known) and
hands its Trainer over; once every member has, the stack trains them all together in the calling thread; then each
member's thread runs on alone, one after the other, with its training done (evaluation, ``model.pth``, summary). The
process state a run's set-up leaves (the logging handlers, Hydra's job config) is kept at the hand-over and put back
when its thread runs on; during training a member's log records go to its own handlers.

The stack owns the members' weights: ``StackedTrainer`` holds them, and their Adam moments, as rows of stacked
tensors (one per parameter), and every member's model and optimiser state are views of its rows, so that its
checkpoints, validation and images read the current weights with no copy. One step for all members: the batches
(one gather from the members' indices), one loss over all members (``torch.func.vmap`` of ``grad`` of the members'
``functional_call``), one Adam update over the stacked tensors, with each member's step count, learning rate,
beta and lambda as a row. Members draw their batches, directions and reparameterisation noise from generators of
their own (``Trainer.generators``, ``TrainingStep``), exactly as they would alone; the step reads no global
generator. The step has no host read and no branch on tensor values, so it can run under ``torch.compile``
(``compile=True``). Everything else a run does per step (counting, logging, checkpoints, validation, stop signals)
is its own Trainer's ``fit_steps``, unchanged.

Members whose losses take the same branches and shapes (``VAELoss.fusion_key``: with or without the semantic term,
its sizes) share one step; a stack of both kinds runs two. beta, lambda, the directions' kind and step, the seed
and the position (a member resumed from a later step) may differ. A member's rows depend on its own loss only, so a
member whose loss turns non-finite fails alone at its next log point, as it would alone (its Trainer's check: no
per-step host read); the stack then goes on without it. A member's weights equal a lone run's up to float rounding
(the vectorised convolutions sum in another order; tests/test_stacking.py states the tolerance).
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from semvae import stopping
from semvae.losses import TrainingStep, VAELoss
from semvae.runtime import autocast
from semvae.training.trainer import FitResult, Trainer

log = logging.getLogger(__name__)

_local = threading.local()


def fit(trainer: Trainer, resume: str | Path | None) -> FitResult:
    """``trainer.fit(resume)``; in a member of a stack (``run_stacked``), the stack trains it with the others."""
    member = getattr(_local, "member", None)
    return trainer.fit(resume) if member is None else member.train(trainer, resume)


def _capture() -> tuple:
    """The process state a run's set-up leaves: the root logger's handlers and level, Hydra's job config."""
    from hydra.core.hydra_config import HydraConfig

    root = logging.getLogger()
    return list(root.handlers), root.level, HydraConfig.instance().cfg


def _restore(state: tuple) -> None:
    from hydra.core.hydra_config import HydraConfig

    handlers, level, hydra = state
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level)
    HydraConfig.instance().cfg = hydra


class _Member:
    """A member's thread and the hand-over between it and the stack: exactly one of them runs at a time."""

    def __init__(self, index: int, job: Callable[[], Any]):
        self.index, self.job = index, job
        self.go, self.parked = threading.Event(), threading.Event()
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.trainer: Trainer | None = None  # handed over to be trained
        self.resume: str | Path | None = None
        self.outcome: FitResult | BaseException | None = None  # what its training came to
        self.saved: tuple | None = None
        self.thread = threading.Thread(target=self._main, name=f"stack-member-{index}", daemon=True)

    def _main(self) -> None:
        _local.member = self
        self.go.wait()
        try:
            self.result = self.job()
        except BaseException as error:  # noqa: BLE001 - handed to the caller with the member's result
            self.error = error
        finally:
            self.done = True
            self.parked.set()

    def run_until_parked(self) -> None:
        """(caller) Let the member's thread run until it hands its Trainer over or ends."""
        self.parked.clear()
        self.go.set()
        self.parked.wait()

    def train(self, trainer: Trainer, resume: str | Path | None) -> FitResult:
        """(member) Hand ``trainer`` to the stack and wait until the stack has trained it; its FitResult."""
        if not isinstance(trainer.step_fn, TrainingStep):
            raise TypeError("only VAE trainings (task=train_vae) can be stacked")
        if self.trainer is not None:
            raise RuntimeError("a stack member trains one model")
        self.trainer, self.resume = trainer, resume
        self.saved = _capture()
        self.go.clear()
        self.parked.set()
        self.go.wait()
        _restore(self.saved)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def run_stacked(jobs: Sequence[Callable[[], Any]], compile: bool = False) -> list[tuple[Any, BaseException | None]]:
    """Run ``jobs`` (each trains one VAE, e.g. a task function bound to its config) as members of one stack.

    Returns each job's (result, exception). The caller's logging handlers and Hydra job config are restored."""
    outer = _capture()
    members = [_Member(i, job) for i, job in enumerate(jobs)]
    for member in members:
        member.thread.start()
    try:
        for member in members:  # each member's set-up, one after the other
            member.run_until_parked()
        training = [m for m in members if not m.done]
        try:
            StackedTrainer(training, compile=compile).fit()
        except BaseException as error:  # noqa: BLE001 - the stack itself failed: every member still training fails
            for member in training:
                if member.outcome is None:
                    member.outcome = error
        for member in training:  # each member's evaluation and export, one after the other
            member.run_until_parked()
    finally:
        _restore(outer)
    for member in members:
        member.thread.join()
    return [(m.result, m.error) for m in members]


class _RoundFlag:
    """The stop flag as the members' Trainers read it: the stack's, read once at the start of every step of the
    stack, so that a signal stops every member after the same step."""

    def __init__(self) -> None:
        self.signum: int | None = None


class _ToMember(logging.Handler):
    """While the stack trains: each log record goes to the handlers of the member whose code logs it."""

    def __init__(self) -> None:
        super().__init__()
        self.handlers: list[logging.Handler] = []

    def emit(self, record: logging.LogRecord) -> None:
        for handler in self.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


class StackedTrainer:
    """Trains the handed-over Trainers of ``members`` together (see the module's docstring); sets each member's
    ``outcome`` to its FitResult or to the exception that ended its training."""

    def __init__(self, members: Sequence[_Member], compile: bool = False):
        self.members, self.compile = list(members), compile
        self.flag = _RoundFlag()
        self.dispatch = _ToMember()

    def fit(self) -> None:
        live = [m for m in self.members if self._start(m)]
        stacks = self._stack(live)
        while live:
            self.flag.signum = stopping.requested()
            results = []
            for stack in stacks:
                try:
                    results.append((stack, stack.step([m.index for m in stack.members]), None))
                except Exception as error:  # noqa: BLE001 - every member of this stack fails with it, in its run
                    results.append((stack, None, error))
            self._schedule(live)
            ended = []
            for stack, terms, error in results:
                for i, member in enumerate(stack.members):
                    sent = {k: v[i] for k, v in terms.items()} if terms is not None else None
                    if not self._advance(member, sent, error):
                        ended.append(member)
            if ended:
                for stack in stacks:
                    stack.release()
                live = [m for m in live if m not in ended]
                stacks = self._stack(live)
        for member in self.members:
            if getattr(member, "stop", None) is not None:
                member.trainer.stop = member.stop

    def _start(self, member: _Member) -> bool:
        """Start the member's ``fit_steps`` (it resumes, its callbacks start); whether it has steps to do."""
        trainer = member.trainer
        member.stop, trainer.stop = trainer.stop, self.flag
        member.steps = trainer.fit_steps(member.resume)
        member.handlers = member.saved[0]
        return self._advance(member, None)

    def _advance(self, member: _Member, terms: dict[str, Tensor] | None, error: BaseException | None = None) -> bool:
        """Run the member's own loop up to its next step (counting, logging, checkpoints, validation), or end it
        with the ``error`` of its step; whether it goes on."""
        root = logging.getLogger()
        root.handlers[:] = [self.dispatch]
        self.dispatch.handlers = member.handlers
        try:
            if error is not None:
                member.steps.throw(error)
            member.index = next(member.steps) if terms is None else member.steps.send(terms)
            return True
        except StopIteration as done:
            member.outcome = done.value
        except BaseException as error:  # noqa: BLE001 - the member's own failure, raised again in its thread
            member.outcome = error
        return False

    def _schedule(self, live: Sequence[_Member]) -> None:
        """Each member's learning-rate schedule, stepped after its optimiser step as a lone run steps it."""
        for member in live:
            if member.trainer.scheduler is not None:
                with warnings.catch_warnings():  # the member's own optimiser object never steps: the stack does
                    warnings.simplefilter("ignore", UserWarning)
                    member.trainer.scheduler.step()

    def _stack(self, live: Sequence[_Member]) -> list[_Stack]:
        groups: dict[tuple, list[_Member]] = {}
        for member in live:
            trainer = member.trainer
            shapes = tuple((n, tuple(p.shape)) for n, p in trainer.model.named_parameters())
            key = (type(trainer.model), shapes, trainer.train.images.device, trainer.precision)
            groups.setdefault((*key, trainer.step_fn.loss.fusion_key()), []).append(member)
        return [_Stack(group, self.compile) for group in groups.values()]


class _Objective(nn.Module):
    """``VAELoss.terms`` as a module call, so that ``functional_call`` can swap in one member's weights."""

    def __init__(self, vae: nn.Module, loss: VAELoss):
        super().__init__()
        self.vae, self.loss = vae, loss

    def forward(self, x, noise, directions, beta, weight) -> dict[str, Tensor]:
        return self.loss.terms(self.vae, x, directions, noise, beta, weight)


class _Stack:
    """Members whose losses share branches and shapes: their weights and Adam moments as rows of stacked tensors,
    one step for all of them."""

    def __init__(self, members: Sequence[_Member], compile: bool):
        self.members = list(members)
        trainers = [m.trainer for m in self.members]
        lead = trainers[0]
        self.names = [name for name, _ in lead.model.named_parameters()]
        self.images, self.device, self.batch = lead.train.images, lead.train.images.device, lead.settings.batch_size
        group = lead.optimizer.param_groups[0]
        if group["amsgrad"] or group["maximize"]:
            raise ValueError("a stack trains with plain Adam")
        self.lrs = torch.tensor([t.optimizer.param_groups[0]["lr"] for t in trainers], dtype=torch.float64)
        self.lrs = self.lrs.to(self.device)
        self.scheduled = any(t.scheduler is not None for t in trainers)
        steps, self.params, self.exp_avg, self.exp_avg_sq, self.counters = [], {}, {}, {}, []
        for t in trainers:
            first = t.optimizer.state.get(t.model.get_parameter(self.names[0]), {})
            steps.append(float(first.get("step", 0.0)))
        self.steps = torch.tensor(steps, dtype=torch.float64, device=self.device)
        for name in self.names:
            weights = [t.model.get_parameter(name) for t in trainers]
            states = [t.optimizer.state.get(p, {}) for t, p in zip(trainers, weights, strict=True)]
            self.params[name] = torch.stack([p.detach() for p in weights])
            for moments, key in ((self.exp_avg, "exp_avg"), (self.exp_avg_sq, "exp_avg_sq")):
                rows = [s[key] if key in s else torch.zeros_like(p) for s, p in zip(states, weights, strict=True)]
                moments[name] = torch.stack(rows)
            # the members' weights and moments become views of their rows; their step counts stay tensors of
            # their own (a lone run's checkpoint format), counted on the host
            for i, (t, p) in enumerate(zip(trainers, weights, strict=True)):
                p.data = self.params[name][i]
                state = t.optimizer.state[p]
                count = state.get("step", torch.tensor(steps[i], dtype=torch.float32))
                state.update(step=count, exp_avg=self.exp_avg[name][i], exp_avg_sq=self.exp_avg_sq[name][i])
                self.counters.append(count)
        losses = [t.step_fn.loss for t in trainers]
        self.beta = torch.tensor([loss.beta for loss in losses], device=self.device)
        self.weight = torch.tensor([loss.semantic_weight for loss in losses], device=self.device)
        self.semantic = losses[0].features is not None
        update = _adam_update(_Objective(lead.model, losses[0]), lead.precision, self.device, group, self.semantic)
        self.update = torch.compile(update) if compile else update

    def step(self, indices: Sequence[Tensor]) -> dict[str, Tensor]:
        """One optimiser step of every member on its batch ``indices[i]``; the loss terms, members first."""
        x = self.images[torch.stack(list(indices))]
        draws = [m.trainer.step_fn.draws(self.batch, self.device) for m in self.members]
        noise = torch.stack([noise for _, noise in draws])
        directions = torch.stack([d for d, _ in draws]) if self.semantic else None
        if self.scheduled:
            lrs = [m.trainer.optimizer.param_groups[0]["lr"] for m in self.members]
            self.lrs.copy_(torch.tensor(lrs, dtype=torch.float64), non_blocking=True)
        terms = self.update(
            self.params, self.exp_avg, self.exp_avg_sq, self.steps, self.lrs, x, noise, directions, self.beta,
            self.weight,
        )  # fmt: skip
        torch._foreach_add_(self.counters, 1.0)
        return terms

    def release(self) -> None:
        """The members' weights and moments become tensors of their own again (the stack is rebuilt or ends)."""
        for m in self.members:
            t = m.trainer
            for name in self.names:
                p = t.model.get_parameter(name)
                p.data = p.data.clone()
                state = t.optimizer.state[p]
                state.update(exp_avg=state["exp_avg"].clone(), exp_avg_sq=state["exp_avg_sq"].clone())


def _adam_update(objective: _Objective, precision: str, device: torch.device, group: dict, semantic: bool):
    """The stacked step: every member's loss terms and gradient (vmap of grad of ``functional_call``), then Adam
    on the stacked tensors in place, as ``torch.optim.Adam`` (its single-tensor form) steps each member alone: the
    bias corrections in float64 from each member's step count, the rest in the weights' dtype."""
    beta1, beta2 = group["betas"]
    eps, weight_decay = group["eps"], group["weight_decay"]

    def member_loss(params, x, noise, directions, beta, weight):
        terms = torch.func.functional_call(objective, params, (x, noise, directions, beta, weight))
        return terms["loss"], terms

    gradient = torch.func.vmap(
        torch.func.grad(member_loss, has_aux=True), in_dims=(0, 0, 0, 0 if semantic else None, 0, 0)
    )

    def update(params, exp_avg, exp_avg_sq, steps, lrs, x, noise, directions, beta, weight):
        named = {f"vae.{k}": v for k, v in params.items()}
        with autocast(device, precision):
            grads, terms = gradient(named, x, noise, directions, beta, weight)
        with torch.no_grad():
            steps.add_(1)
            step_size = (lrs / (1 - beta1**steps)).float()
            root_correction = (1 - beta2**steps).sqrt().float()
            for name, p in params.items():
                g = grads[f"vae.{name}"]
                if weight_decay != 0:
                    g = g.add(p, alpha=weight_decay)
                shape = (-1,) + (1,) * (p.dim() - 1)
                m, v = exp_avg[name], exp_avg_sq[name]
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v.sqrt() / root_correction.view(shape)).add_(eps)
                p.sub_(step_size.view(shape) * m / denom)
        return terms

    return update
