"""The side concerns of the training loop, one small callback each: checkpoints, metrics, images, progress.

``standard_callbacks`` is the set every task trains with; a new concern (an early stop, a profiler) is one more
``Callback`` subclass added to that list.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from semvae import checkpoints
from semvae.tracking import Tracker
from semvae.training.trainer import Callback, NonFiniteLossError, Trainer

ImageFn = Callable[[nn.Module], dict[str, Tensor]]  # model -> {W&B key: images (B, 1, H, W) in [0, 1]}


class Checkpoints(Callback):
    """``last.pt`` after every epoch and, mid-epoch, at the first log point ``every`` steps after the last save or
    when a stop signal came; ``best.pt`` when the monitored validation metric improved. Every file is written
    atomically, holds the trainer's whole state plus ``extra`` (config, architecture, ...), and is never written
    with non-finite weights: then the run fails and the last finite checkpoint stays."""

    def __init__(self, run_dir: str | Path, every: int | None, extra: dict[str, Any] | None = None):
        self.last, self.best = Path(run_dir) / "last.pt", Path(run_dir) / "best.pt"
        self.every, self.extra = every, dict(extra or {})
        self.last_saved = 0

    def on_fit_start(self, trainer: Trainer) -> None:
        self.last.parent.mkdir(parents=True, exist_ok=True)
        self.last_saved = trainer.step

    def on_log(self, trainer: Trainer, means: dict[str, float]) -> None:
        due = self.every is not None and trainer.step - self.last_saved >= self.every
        if (due or trainer.stopping) and trainer.position < trainer.n_batches:  # epoch ends save below
            self.save(trainer)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        state = self.save(trainer)
        if trainer.improved:
            checkpoints.save_atomic(state, self.best)

    def save(self, trainer: Trainer) -> dict[str, Any]:
        state = trainer.state_dict() | self.extra
        if not checkpoints.all_finite(state["model"], state["optimizer"]["state"]):
            kept = (
                f"the last finite checkpoint {self.last} is kept" if self.last.is_file() else "no checkpoint was saved"
            )
            raise NonFiniteLossError(
                f"non-finite weights after step {trainer.step} (epoch {trainer.epoch}); not saved, {kept}"
            )
        checkpoints.save_atomic(state, self.last)
        self.last_saved = trainer.step
        return state


class Metrics(Callback):
    """Train losses at every log point and the epoch's record to the tracker (``metrics.jsonl``, W&B). At the start,
    records of steps after the one training starts from are dropped (all of them on a fresh start): they were
    logged by an earlier attempt killed before its next checkpoint, and the steps run again and log them again, so
    every step is in the file once."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    def on_fit_start(self, trainer: Trainer) -> None:
        self.tracker.forget_after(trainer.step)

    def on_log(self, trainer: Trainer, means: dict[str, float]) -> None:
        self.tracker.log({f"train/{k}": v for k, v in means.items()} | {"epoch": trainer.epoch}, step=trainer.step)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        self.tracker.log(dict(record), step=trainer.step)


class Images(Callback):
    """The images of ``image_fn`` (reconstructions, prior samples) after every epoch, in eval mode."""

    def __init__(self, tracker: Tracker, image_fn: ImageFn):
        self.tracker, self.image_fn = tracker, image_fn

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        trainer.model.eval()
        with torch.no_grad():
            self.tracker.log_images(self.image_fn(trainer.model), step=trainer.step)
        trainer.model.train()


class ProgressBar(Callback):
    """One tqdm bar for the whole run (its ETA is the run's), labelled with the epoch and the latest train losses."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        s = trainer.settings
        self.bar = tqdm(
            total=s.epochs * trainer.n_batches,
            initial=trainer.step,
            desc=f"epoch {trainer.epoch + 1}/{s.epochs}",
            leave=False,
            dynamic_ncols=True,
        )

    def on_step(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.set_description(f"epoch {trainer.epoch}/{trainer.settings.epochs}", refresh=False)
            self.bar.update(1)

    def on_log(self, trainer: Trainer, means: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in means.items()}, refresh=False)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def standard_callbacks(
    run_dir: str | Path,
    tracker: Tracker,
    checkpoint_every: int | None,
    progress: bool = True,
    image_fn: ImageFn | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
) -> list[Callback]:
    """Metrics, images (when ``image_fn`` is given), checkpoints and the progress bar, in that order."""
    callbacks: list[Callback] = [Metrics(tracker)]
    if image_fn is not None:
        callbacks.append(Images(tracker, image_fn))
    callbacks.append(Checkpoints(run_dir, checkpoint_every, checkpoint_extra))
    if progress:
        callbacks.append(ProgressBar())
    return callbacks
