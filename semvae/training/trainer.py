"""One training loop for the VAE and the classifier: Adam, a validation per epoch, exact resume.

``Trainer.fit`` reads top to bottom: resume, then per epoch the batches (one optimiser step each, the running
losses read back to the host only at log points), then validation. What happens around the loop (checkpoints,
metrics, images, the progress bar) is a ``Callback`` in ``semvae/training/callbacks.py``; the loop only decides
when. A resumed run continues with the same model, optimiser, schedule, position in the epoch and random-generator
states, so on a CPU it matches an uninterrupted run bit for bit.

The loop is a generator, ``fit_steps``: it yields the batch of each optimiser step and is sent back the step's loss
terms. ``fit`` performs each step with the Trainer's own model and Adam; whoever drives ``fit_steps`` otherwise
(several runs trained as one, ``semvae/training/stacking.py``) performs the steps its own way, and everything else
(resume, logging, validation, checkpoints, stop signals) happens here, as in a lone run.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from semvae import checkpoints
from semvae.config import TrainerConfig
from semvae.data import Split, batch_indices
from semvae.runtime import autocast, rng_state, set_rng_state
from semvae.stopping import StopFlag, StopRequested

log = logging.getLogger(__name__)

StepFn = Callable[[nn.Module, Tensor, Tensor], dict[str, Tensor]]  # (model, x, y) -> {"loss": ..., term: ...}
# yields each optimiser step's batch indices, is sent the step's loss terms, returns the FitResult
FitSteps = Generator[Tensor, dict[str, Tensor], "FitResult"]


class NonFiniteLossError(RuntimeError):
    """A loss or the weights became NaN or infinite; the message names the step and the terms."""


@dataclass
class FitResult:
    epochs: int
    steps: int
    seconds: float
    val: dict[str, float]
    best_epoch: int
    best_value: float
    history: list[dict[str, float]] = field(default_factory=list)
    last_checkpoint: Path | None = None


class Callback:
    """A side concern of the loop. Every hook gets the trainer, whose attributes (``step``, ``epoch``,
    ``stopping``, ``model``, ...) say where the loop is."""

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_step(self, trainer: Trainer) -> None: ...  # after every optimiser step

    def on_log(self, trainer: Trainer, means: dict[str, float]) -> None: ...  # train means since the last log point

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None: ...

    def on_fit_end(self, trainer: Trainer) -> None: ...  # after the loop, also when it stops or fails


@torch.no_grad()
def mean_terms(model: nn.Module, split: Split, fn: StepFn, batch_size: int, limit: int | None) -> dict[str, float]:
    """Mean of each term of ``fn`` over ``split`` (weighted by batch size), in eval mode; one host read."""
    model.eval()
    totals: dict[str, Tensor] = {}
    count = 0
    for i, index in enumerate(batch_indices(len(split), batch_size, None, split.images.device, drop_last=False)):
        if limit is not None and i >= limit:
            break
        for key, value in fn(model, split.images[index], split.labels[index]).items():
            totals[key] = totals.get(key, 0.0) + value.detach() * index.numel()
        count += index.numel()
    model.train()
    keys = list(totals)
    values = torch.stack([totals[k] for k in keys]).div(count).tolist() if keys else []
    return dict(zip(keys, values, strict=True))


def duration(seconds: float) -> str:
    """``1h02m``, ``3m20s`` or ``45s``."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def check_finite(terms: dict[str, float], step: int, epoch: int) -> None:
    if not all(math.isfinite(v) for v in terms.values()):
        listed = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
        raise NonFiniteLossError(f"non-finite loss at step {step} (epoch {epoch}): {listed}")


class Trainer:
    """Train ``model`` with Adam on ``train`` (a Split on the training device), validating on ``val`` each epoch.

    ``step_fn`` returns the loss terms of one batch, "loss" being the one minimised; ``eval_fn`` the validation
    terms (run under no_grad). ``generators`` are extra CPU generators the step functions draw from (e.g. the
    semantic directions); their states are part of every checkpoint, with the batch order's. ``precision="bf16"``
    runs the training step under bfloat16 autocast; validation always runs in fp32. ``stop`` is the flag set by
    stop signals: the loop then finishes its step, lets the callbacks save, and raises StopRequested.
    """

    def __init__(
        self,
        model: nn.Module,
        train: Split,
        val: Split,
        step_fn: StepFn,
        eval_fn: StepFn,
        settings: TrainerConfig,
        *,
        seed: int,
        precision: str = "fp32",
        generators: dict[str, torch.Generator] | None = None,
        monitor: str = "loss",
        monitor_mode: str = "min",
        callbacks: Sequence[Callback] = (),
        stop: StopFlag | None = None,
    ):
        self.model, self.train, self.val = model, train, val
        self.step_fn, self.eval_fn, self.settings = step_fn, eval_fn, settings
        self.precision, self.monitor, self.stop = precision, monitor, stop
        self.callbacks = list(callbacks)
        self.sign = 1.0 if monitor_mode == "min" else -1.0
        self.generators = dict(generators or {}) | {"batches": torch.Generator().manual_seed(seed)}
        self.optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.n_batches = len(train) // settings.batch_size
        if settings.limit_train_batches is not None:
            self.n_batches = min(self.n_batches, settings.limit_train_batches)
        if self.n_batches == 0:
            raise ValueError(f"trainer.batch_size={settings.batch_size} exceeds the {len(train)} training images")
        schedule = getattr(settings.lr_schedule, "value", settings.lr_schedule)
        if schedule == "cosine":  # per step, from lr down to 0 at the last step
            total = settings.epochs * self.n_batches
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total)
        elif schedule == "constant":
            self.scheduler = None
        else:
            raise ValueError(f"trainer.lr_schedule={schedule!r}: allowed values: constant, cosine")
        # where the loop is; all of it goes into a checkpoint
        self.epoch, self.step, self.position = 0, 0, 0  # epochs done (then: the current one), steps, batch in epoch
        self.best_value, self.best_epoch, self.improved = math.inf, 0, False
        self.history: list[dict[str, float]] = []
        self.val_metrics: dict[str, float] = {}
        self.epoch_generator: Tensor | None = None  # batch-order state at the start of the current epoch
        self.epoch_sum: Tensor | None = None  # sums of the step losses read so far in this epoch
        self.epoch_steps = 0
        self.keys: list[str] = []  # names of the step's loss terms
        self.seconds_before = 0.0  # training time of the segments before a resume
        self.started, self.start_step = time.perf_counter(), 0
        self.resumed_from: Path | None = None
        self.estimated = False  # whether the run's first time estimate has been logged

    @property
    def stopping(self) -> bool:
        return self.stop is not None and self.stop.signum is not None

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def fit(self, resume: str | Path | None = None) -> FitResult:
        """Train to the end (continuing ``resume`` when given), each step with this Trainer's model and Adam."""
        steps = self.fit_steps(resume)
        try:
            index = next(steps)
            while True:
                try:
                    terms = self.optimizer_step(index)
                except BaseException as error:  # noqa: BLE001 - raised inside the loop, so that its callbacks end
                    index = steps.throw(error)
                else:
                    index = steps.send(terms)
        except StopIteration as done:
            return done.value

    def fit_steps(self, resume: str | Path | None = None) -> FitSteps:
        """The training as a generator: yields the batch indices of every optimiser step and expects the step's
        loss terms (on the device) sent back once the step is done; returns the FitResult."""
        s = self.settings
        if resume is not None:
            self.load_state(resume)
        self.started, self.start_step = time.perf_counter(), self.step
        for cb in self.callbacks:
            cb.on_fit_start(self)
        try:
            yield from self.loop()
        finally:
            for cb in self.callbacks:
                cb.on_fit_end(self)
        return FitResult(
            epochs=s.epochs,
            steps=self.step,
            seconds=self.seconds,
            val=self.val_metrics,
            best_epoch=self.best_epoch,
            best_value=self.best_value,
            history=self.history,
            last_checkpoint=self.last_checkpoint,
        )

    def loop(self) -> Generator[Tensor, dict[str, Tensor], None]:
        s = self.settings
        self.model.train()
        for epoch in range(self.epoch + 1, s.epochs + 1):
            self.epoch = epoch
            # batch order: drawn fresh, or the interrupted epoch's drawn again with the batches done skipped
            if self.position == 0:
                self.epoch_generator = self.generators["batches"].get_state()
                self.epoch_sum, self.epoch_steps = None, 0
            else:
                self.generators["batches"].set_state(self.epoch_generator)
            device = self.train.images.device
            order = batch_indices(len(self.train), s.batch_size, self.generators["batches"], device, drop_last=True)
            running, since_log = None, 0
            for i, index in enumerate(order):
                if i >= self.n_batches:
                    break
                if i < self.position:
                    continue
                # one optimiser step; the loss terms stay on the device
                values = self.count_step((yield index))
                running = values if running is None else running + values
                since_log += 1
                self.position = i + 1
                for cb in self.callbacks:
                    cb.on_step(self)
                last_batch = i == self.n_batches - 1
                if since_log == s.log_every or last_batch or self.stopping:
                    # log point: the only host read of the step losses
                    means = dict(zip(self.keys, (running / since_log).tolist(), strict=True))
                    check_finite(means, self.step, epoch)
                    self.epoch_sum = running if self.epoch_sum is None else self.epoch_sum + running
                    running, since_log = None, 0
                    for cb in self.callbacks:
                        cb.on_log(self, means)  # a checkpoint callback saves here when due or stopping
                    if not self.estimated:  # the run's cost, known after its first log point, not after an epoch
                        self.estimated = True
                        total, done = self.settings.epochs * self.n_batches, self.step - self.start_step
                        left = total - self.step
                        log.info("%d steps took %s; %d of %d left: %s", done, self.timed(), left, total, self.eta())
                    if self.stopping and not last_batch:
                        raise self.stopped()
            self.position = 0
            # validation, the epoch's record, best model
            self.val_metrics = mean_terms(self.model, self.val, self.eval_fn, s.batch_size, s.limit_eval_batches)
            check_finite(self.val_metrics, self.step, epoch)
            train_means = {}
            if self.epoch_sum is not None:
                train_means = dict(zip(self.keys, (self.epoch_sum / self.epoch_steps).tolist(), strict=True))
            record = {
                "epoch": epoch,
                **{f"train/{k}": v for k, v in train_means.items()},
                **{f"val/{k}": v for k, v in self.val_metrics.items()},
            }
            self.history.append(record)
            value = self.val_metrics[self.monitor]
            self.improved = self.sign * value < self.sign * self.best_value if math.isfinite(self.best_value) else True
            if self.improved:
                self.best_value, self.best_epoch = value, epoch
            for cb in self.callbacks:
                cb.on_epoch_end(self, record)  # metrics, images, last.pt (and best.pt when improved)
            listed = "  ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch")
            log.info("epoch %d/%d  %s  (%s)", epoch, s.epochs, listed, self.eta())
            if self.stopping and epoch < s.epochs:
                raise self.stopped()

    def timed(self) -> str:
        return duration(time.perf_counter() - self.started)

    def eta(self) -> str:
        """Time left for the run at this segment's speed so far, and the wall-clock time it ends."""
        done, left = self.step - self.start_step, self.settings.epochs * self.n_batches - self.step
        if left <= 0:
            return "done"
        if done <= 0:
            return "eta unknown"
        seconds = (time.perf_counter() - self.started) / done * left
        return f"eta {duration(seconds)}, at {time.strftime('%H:%M', time.localtime(time.time() + seconds))}"

    def optimizer_step(self, index: Tensor) -> dict[str, Tensor]:
        """One Adam step (and the schedule's) on the batch ``index``; returns its loss terms (on the device)."""
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.train.images.device, self.precision):
            terms = self.step_fn(self.model, self.train.images[index], self.train.labels[index])
        terms["loss"].backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return terms

    def count_step(self, terms: dict[str, Tensor]) -> Tensor:
        """Count a done step; returns its loss terms stacked (on the device, no host read)."""
        self.step += 1
        self.epoch_steps += 1
        if not self.keys:
            self.keys = list(terms)
        return torch.stack([terms[k].detach().float() for k in self.keys])

    @property
    def last_checkpoint(self) -> Path | None:
        return next((cb.last for cb in self.callbacks if hasattr(cb, "last")), None)

    def stopped(self) -> StopRequested:
        where = self.last_checkpoint
        return StopRequested(self.stop.signum, f"checkpoint saved at step {self.step} in {where}", where, self.step)

    def state_dict(self) -> dict[str, Any]:
        """Everything ``load_state`` needs to continue exactly here (mid-epoch when ``position`` > 0)."""
        mid_epoch = 0 < self.position < self.n_batches
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": self.epoch - 1 if mid_epoch else self.epoch,  # epochs completed
            "step": self.step,
            "position": self.position if mid_epoch else 0,
            "epoch_generator": self.epoch_generator if mid_epoch else None,
            "epoch_sum": self.epoch_sum if mid_epoch else None,
            "epoch_steps": self.epoch_steps if mid_epoch else 0,
            "rng": rng_state(self.generators),
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "val": self.val_metrics,
            "seconds": self.seconds,
        }

    def load_state(self, path: str | Path) -> None:
        state = checkpoints.load_training_state(path, map_location=self.train.images.device)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as error:
            raise checkpoints.CheckpointError(f"{path} does not fit the configured model: {error}") from None
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], self.generators)
        self.epoch, self.step = state["epoch"], state["step"]
        self.best_value, self.best_epoch, self.history = state["best_value"], state["best_epoch"], state["history"]
        self.val_metrics = state.get("val", {})
        self.seconds_before = state.get("seconds", 0.0)
        self.position, self.epoch_generator = state.get("position", 0), state.get("epoch_generator")
        self.epoch_sum, self.epoch_steps = state.get("epoch_sum"), state.get("epoch_steps", 0)
        self.resumed_from = Path(path)
        where = f"epoch {self.epoch + 1}, batch {self.position}" if self.position else f"the end of epoch {self.epoch}"
        log.info("resumed from %s at %s (step %d)", path, where, self.step)
