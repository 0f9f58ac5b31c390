"""Several VAE trainings in one process with one fused optimiser step for all of them (``hydra/launcher=stacked``).

Each member is an ordinary run: its task function runs unchanged, in a thread of its own, with its own Trainer,
callbacks, run folder, checkpoints, W&B run and evaluation. The threads take turns and never run at the same time:
a member runs until its next optimiser step, hands in its batch together with the directions and the
reparameterisation noise it drew from its own generators, and waits. When every member waits, ``fused_step`` stacks
their weights, computes all their losses in one vectorised call (``torch.func.vmap`` over ``functional_call``) and
one backward pass, and gives each member the gradient of its own loss; each member's Adam then steps as it would
alone. The process-wide state a run owns (torch's and Python's random generators, the logging handlers, Hydra's job
config) is saved when a member hands in and restored when it continues, so every member draws the random numbers it
would draw alone: its weights equal a lone run's up to float rounding (tests/test_stacking.py states the tolerance).

Members whose losses have the same shapes and branches (``VAELoss.fusion_key``) share one vectorised call; beta,
lambda, the direction kind and step and the seed may differ. A member that fails (a non-finite loss, say) ends alone;
the others go on.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from semvae import stopping
from semvae.losses import TrainingStep, VAELoss
from semvae.runtime import autocast

log = logging.getLogger(__name__)

_local = threading.local()


def current() -> _Member | None:
    """The stack member running in this thread, or None when the run trains alone."""
    return getattr(_local, "member", None)


@dataclass
class _Request:
    """One member's share of a fused step: its batch, directions and noise; the step's answer or failure."""

    trainer: Any  # semvae.training.Trainer
    x: Tensor
    noise: Tensor
    directions: Tensor | None
    terms: dict[str, Tensor] = field(default_factory=dict)
    error: BaseException | None = None

    @property
    def loss(self) -> VAELoss:
        return self.trainer.step_fn.loss

    def group(self) -> tuple:
        model = self.trainer.model
        shapes = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
        return (type(model), shapes, self.x.device, self.trainer.precision, self.loss.fusion_key())


def _capture() -> tuple:
    """The process-wide state a run owns: random generators, logging handlers, Hydra's job config."""
    from hydra.core.hydra_config import HydraConfig

    root = logging.getLogger()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    hydra = HydraConfig.instance().cfg
    return random.getstate(), torch.get_rng_state(), cuda, list(root.handlers), root.level, hydra


def _restore(state: tuple) -> None:
    from hydra.core.hydra_config import HydraConfig

    python, cpu, cuda, handlers, level, hydra = state
    random.setstate(python)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level)
    HydraConfig.instance().cfg = hydra


class _Member:
    """A member's thread and the hand-over between it and the driver: exactly one of them runs at a time."""

    def __init__(self, index: int, job: Callable[[], Any]):
        self.index, self.job = index, job
        self.go, self.parked = threading.Event(), threading.Event()
        self.request: _Request | None = None
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.saved: tuple | None = None
        self.stopping = False  # the stop flag as the driver read it at the start of this round
        self.at_barrier = False  # training finished; waits until no member trains any more
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

    def run_until_step(self) -> None:
        """(driver) Let the member run until it hands in its next step or ends."""
        self.parked.clear()
        self.go.set()
        self.parked.wait()

    def step(self, trainer, index: Tensor) -> dict[str, Tensor]:
        """(member) Hand in this optimiser step and wait for the fused step; afterwards the model's ``.grad`` hold
        the gradient of this member's loss. Returns the loss terms."""
        step_fn = trainer.step_fn
        if not isinstance(step_fn, TrainingStep):
            raise TypeError("only VAE trainings (task=train_vae) can be stacked")
        x = trainer.train.images[index]
        directions = step_fn.loss.directions(step_fn.generator, x.device)
        # the reparameterisation noise, drawn from this run's torch generator exactly as it would draw it alone
        noise = torch.randn(x.shape[0], step_fn.loss.latent_dim, device=x.device)
        self.request = _Request(trainer, x, noise, directions)
        self._hand_over()
        request, self.request = self.request, None
        if request.error is not None:
            raise request.error
        return request.terms

    def end_of_training(self) -> None:
        """(member) Training is done: wait until every member's training is done before going on (to the
        evaluation, say), so that no member's training time includes another member's evaluation."""
        self.at_barrier = True
        self._hand_over()
        self.at_barrier = False

    def _hand_over(self) -> None:
        self.saved = _capture()
        self.go.clear()
        self.parked.set()
        self.go.wait()
        _restore(self.saved)


def run_stacked(jobs: Sequence[Callable[[], Any]]) -> list[tuple[Any, BaseException | None]]:
    """Run ``jobs`` (each trains one VAE, e.g. a task function bound to its config) as members of one stack.

    Returns each job's (result, exception). The caller's logging handlers and Hydra job config are restored."""
    outer = _capture()
    members = [_Member(i, job) for i, job in enumerate(jobs)]
    for member in members:
        member.thread.start()
    try:
        active = members
        while active:
            # a stop signal counts from the start of a round, so every member stops after the same step
            stop = stopping.requested() is not None
            training = [m for m in active if not m.at_barrier]
            for member in training or active:  # past the barrier only when no member trains any more
                member.stopping = stop
                member.run_until_step()
            active = [m for m in active if not m.done]
            requests = [m.request for m in active if m.request is not None]
            if requests:
                fused_step(requests)
    finally:
        _restore(outer)
    for member in members:
        member.thread.join()
    return [(m.result, m.error) for m in members]


def fused_step(requests: Sequence[_Request]) -> None:
    """Compute the loss terms and gradients of every request, one vectorised call per group of equal shapes."""
    groups: dict[tuple, list[_Request]] = {}
    for request in requests:
        groups.setdefault(request.group(), []).append(request)
    for group in groups.values():
        try:
            terms = _stacked_terms(group)
        except Exception as error:  # noqa: BLE001 - every member of the group fails with it, in its own run
            for request in group:
                request.error = error
            continue
        for i, request in enumerate(group):
            request.terms = {k: v[i] for k, v in terms.items()}


@functools.lru_cache(maxsize=64)
def _on_device(values: tuple[float, ...], device: torch.device) -> Tensor:
    """The members' loss weights as one tensor, copied to the device once, not at every step."""
    return torch.tensor(values, device=device)


class _Objective(nn.Module):
    """``VAELoss.terms`` as a module call, so that ``functional_call`` can swap in one member's weights."""

    def __init__(self, vae: nn.Module, loss: VAELoss):
        super().__init__()
        self.vae, self.loss = vae, loss

    def forward(self, x, noise, directions, beta, weight) -> dict[str, Tensor]:
        return self.loss.terms(self.vae, x, directions, noise, beta, weight)


def _stacked_terms(group: Sequence[_Request]) -> dict[str, Tensor]:
    """One forward and backward pass for ``group``: returns the terms stacked (members first) and sets each
    member's ``.grad`` to the gradient of its own loss."""
    lead = group[0]
    objective = _Objective(lead.trainer.model, lead.loss)
    names = [name for name, _ in lead.trainer.model.named_parameters()]
    models = [r.trainer.model for r in group]
    params = {
        f"vae.{name}": torch.stack([m.get_parameter(name).detach() for m in models]).requires_grad_() for name in names
    }
    device = lead.x.device
    x = torch.stack([r.x for r in group])
    noise = torch.stack([r.noise for r in group])
    directions = torch.stack([r.directions for r in group]) if lead.directions is not None else None
    beta = _on_device(tuple(r.loss.beta for r in group), device)
    weight = _on_device(tuple(r.loss.semantic_weight for r in group), device)

    def member_terms(p, x, noise, directions, beta, weight):
        return torch.func.functional_call(objective, p, (x, noise, directions, beta, weight))

    in_dims = (0, 0, 0, 0 if directions is not None else None, 0, 0)
    with autocast(device, lead.trainer.precision):
        terms = torch.func.vmap(member_terms, in_dims=in_dims)(params, x, noise, directions, beta, weight)
    grads = torch.autograd.grad(terms["loss"].sum(), list(params.values()))
    for i, model in enumerate(models):
        for name, grad in zip(names, grads, strict=True):
            model.get_parameter(name).grad = grad[i]
    return {k: v.detach() for k, v in terms.items()}
