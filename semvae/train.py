"""One training loop for the VAE and the classifier: Adam, per-epoch validation, checkpoints, resume.

The loop reads losses back to the host only every ``log_every`` steps (running sums stay on the device), so a
step never waits for the accelerator. After each epoch it validates, writes ``last.pt`` (and ``best.pt`` when the
monitored validation metric improves) atomically, and logs. ``resume`` continues from such a checkpoint with
the same model, optimiser and random-generator states, so a resumed CPU run matches an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from semvae import checkpoints
from semvae.data import Split, batch_indices
from semvae.stopping import StopFlag, StopRequested
from semvae.tracking import Tracker

log = logging.getLogger(__name__)

StepFn = Callable[[nn.Module, Tensor, Tensor], dict[str, Tensor]]  # (model, x, y) -> {"loss": ..., term: ...}
ImageFn = Callable[[nn.Module], dict[str, Tensor]]


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message names the step and the terms."""


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    for key, g in generators.items():
        g.set_state(state["generators"][key])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def validate(model: nn.Module, split: Split, eval_fn: StepFn, batch_size: int, limit: int | None) -> dict[str, float]:
    """Mean of each term of ``eval_fn`` over the split (weighted by batch size); one host read at the end."""
    model.eval()
    totals: dict[str, Tensor] = {}
    count = 0
    for i, index in enumerate(batch_indices(len(split), batch_size, None, split.images.device, drop_last=False)):
        if limit is not None and i >= limit:
            break
        terms = eval_fn(model, split.images[index], split.labels[index])
        for key, value in terms.items():
            totals[key] = totals.get(key, 0.0) + value.detach() * index.numel()
        count += index.numel()
    model.train()
    keys = list(totals)
    values = torch.stack([totals[k] for k in keys]).div(count).tolist() if keys else []
    return dict(zip(keys, values, strict=True))


def _check_finite(terms: dict[str, float], step: int, epoch: int) -> None:
    if not all(math.isfinite(v) for v in terms.values()):
        listed = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
        raise NonFiniteLossError(f"non-finite loss at step {step} (epoch {epoch}): {listed}")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware. A CPU without AVX-512 BF16 or AMX (AVX2 only, say) runs
    bf16 convolutions and matmuls emulated, ten to hundreds of times slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device, precision: str):
    """bfloat16 autocast on the training device for ``precision="bf16"``; a no-op context for "fp32"."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"trainer.precision={precision!r}: allowed values: fp32, bf16")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    step_fn: StepFn,
    eval_fn: StepFn,
    *,
    run_dir: str | Path,
    tracker: Tracker,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    lr_schedule: str = "constant",
    seed: int = 0,
    generators: dict[str, torch.Generator] | None = None,
    monitor: str = "loss",
    monitor_mode: str = "min",
    log_every: int = 50,
    checkpoint_every: int | None = 500,
    limit_train_batches: int | None = None,
    limit_eval_batches: int | None = None,
    progress: bool = True,
    resume: str | Path | None = None,
    image_fn: ImageFn | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
    stop: StopFlag | None = None,
    precision: str = "fp32",
) -> FitResult:
    """Train ``model`` with Adam on ``train`` (a Split on the training device) and validate on ``val`` each epoch.

    ``step_fn`` returns the loss terms of one batch, "loss" being the one minimised; ``eval_fn`` the validation
    terms (under no_grad). ``generators`` are extra CPU generators the step functions draw from (e.g. the
    semantic directions); their states are checkpointed with the batch order's. ``checkpoint_extra`` (config,
    architecture, ...) is stored in every checkpoint.

    ``last.pt`` is written after every epoch and, mid-epoch, at the first log point after every
    ``checkpoint_every`` steps; it records the position in the epoch, so ``resume`` continues exactly where it was
    written. When ``stop`` is set by a signal, the loop finishes the current step, writes ``last.pt`` and raises
    StopRequested.

    ``precision="bf16"`` runs the training step under bfloat16 autocast (weights, optimiser and loss reductions
    stay fp32); validation always runs in fp32.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    generators = dict(generators or {})
    generators["batches"] = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    n_batches = len(train) // batch_size
    if limit_train_batches is not None:
        n_batches = min(n_batches, limit_train_batches)
    if n_batches == 0:
        raise ValueError(f"trainer.batch_size={batch_size} exceeds the {len(train)} training images")
    if lr_schedule == "cosine":  # per step, from lr down to 0 at the last step
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * n_batches)
    elif lr_schedule == "constant":
        scheduler = None
    else:
        raise ValueError(f"trainer.lr_schedule={lr_schedule!r}: allowed values: constant, cosine")
    sign = 1.0 if monitor_mode == "min" else -1.0
    done_epochs, step, best_value, best_epoch, history = 0, 0, math.inf, 0, []
    seconds_before = 0.0  # training time of the segments before a resume
    val_metrics: dict[str, float] = {}
    position, epoch_generator, epoch_sum, epoch_steps = 0, None, None, 0  # progress inside an unfinished epoch

    if resume is not None:
        state = checkpoints.load_training_state(resume, map_location=train.images.device)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as error:
            raise checkpoints.CheckpointError(f"{resume} does not fit the configured model: {error}") from None
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], generators)
        done_epochs, step = state["epoch"], state["step"]
        best_value, best_epoch, history = state["best_value"], state["best_epoch"], state["history"]
        val_metrics = state.get("val", {})
        seconds_before = state.get("seconds", 0.0)
        position, epoch_generator = state.get("position", 0), state.get("epoch_generator")
        epoch_sum, epoch_steps = state.get("epoch_sum"), state.get("epoch_steps", 0)
        tracker.forget_after(step)  # records logged after this checkpoint are logged again
        where = f"epoch {done_epochs + 1}, batch {position}" if position else f"the end of epoch {done_epochs}"
        log.info("resumed from %s at %s (step %d)", resume, where, step)

    paths = {"last": run_dir / "last.pt", "best": run_dir / "best.pt"}

    def training_state(epoch_done: int, pos: int) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "epoch": epoch_done,
            "step": step,
            "position": pos,
            "epoch_generator": epoch_generator if pos else None,
            "epoch_sum": epoch_sum if pos else None,
            "epoch_steps": epoch_steps if pos else 0,
            "rng": rng_state(generators),
            "best_value": best_value,
            "best_epoch": best_epoch,
            "history": history,
            "val": val_metrics,
            "seconds": seconds_before + time.perf_counter() - started,
            **(checkpoint_extra or {}),
        }

    def save(state: dict[str, Any], path: Path, epoch: int) -> None:
        """Write a checkpoint, unless its weights went non-finite: then the last finite one stays."""
        if not checkpoints.all_finite(state["model"], state["optimizer"]["state"]):
            raise NonFiniteLossError(
                f"non-finite weights after step {step} (epoch {epoch}); not saved, the last finite checkpoint "
                f"{paths['last']} is kept"
            )
        checkpoints.save_atomic(state, path)

    started = time.perf_counter()
    last_saved = step
    model.train()
    for epoch in range(done_epochs + 1, epochs + 1):
        if position == 0:
            epoch_generator = generators["batches"].get_state()
            epoch_sum, epoch_steps = None, 0
        else:  # draw this epoch's batch order again and skip the batches already done
            generators["batches"].set_state(epoch_generator)
        running: Tensor | None = None
        keys: list[str] = []
        since_log = 0
        bar = tqdm(
            total=n_batches,
            initial=position,
            desc=f"epoch {epoch}/{epochs}",
            disable=not progress,
            leave=False,
            dynamic_ncols=True,
        )
        batches = batch_indices(len(train), batch_size, generators["batches"], train.images.device, drop_last=True)
        for i, index in enumerate(batches):
            if i >= n_batches:
                break
            if i < position:
                continue
            with autocast(train.images.device, precision):
                terms = step_fn(model, train.images[index], train.labels[index])
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            epoch_steps += 1
            since_log += 1
            if not keys:
                keys = list(terms)
            values = torch.stack([terms[k].detach().float() for k in keys])
            running = values if running is None else running + values
            bar.update(1)
            stopping = stop is not None and stop.signum is not None
            if since_log == log_every or i == n_batches - 1 or stopping:
                # the only host read of the step losses
                means = dict(zip(keys, (running / since_log).tolist(), strict=True))
                _check_finite(means, step, epoch)
                tracker.log({f"train/{k}": v for k, v in means.items()} | {"epoch": epoch}, step=step)
                bar.set_postfix({k: f"{v:.4g}" for k, v in means.items()}, refresh=False)
                epoch_sum = running if epoch_sum is None else epoch_sum + running
                running, since_log = None, 0
                due = checkpoint_every is not None and step - last_saved >= checkpoint_every
                if (stopping or due) and i < n_batches - 1:
                    save(training_state(epoch - 1, i + 1), paths["last"], epoch)
                    last_saved = step
                if stopping and i < n_batches - 1:
                    bar.close()
                    raise _stopped(stop.signum, paths["last"], step)
        bar.close()
        position = 0

        val_metrics = validate(model, val, eval_fn, batch_size, limit_eval_batches)
        _check_finite(val_metrics, step, epoch)
        train_means = dict(zip(keys, (epoch_sum / epoch_steps).tolist(), strict=True)) if epoch_sum is not None else {}
        record = {
            "epoch": epoch,
            **{f"train/{k}": v for k, v in train_means.items()},
            **{f"val/{k}": v for k, v in val_metrics.items()},
        }
        history.append(record)
        tracker.log({k: v for k, v in record.items()}, step=step)
        if image_fn is not None:
            model.eval()
            with torch.no_grad():
                tracker.log_images(image_fn(model), step=step)
            model.train()

        value = val_metrics[monitor]
        improved = sign * value < sign * best_value if math.isfinite(best_value) else True
        if improved:
            best_value, best_epoch = value, epoch
        state = training_state(epoch, 0)
        save(state, paths["last"], epoch)
        last_saved = step
        if improved:
            checkpoints.save_atomic(state, paths["best"])
        log.info("epoch %d/%d  %s", epoch, epochs, "  ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"))
        if stop is not None and stop.signum is not None and epoch < epochs:
            raise _stopped(stop.signum, paths["last"], step)

    return FitResult(
        epochs=epochs,
        steps=step,
        seconds=seconds_before + time.perf_counter() - started,
        val=val_metrics,
        best_epoch=best_epoch,
        best_value=best_value,
        history=history,
        last_checkpoint=paths["last"],
    )


def _stopped(signum: int, checkpoint: Path, step: int) -> StopRequested:
    return StopRequested(signum, f"checkpoint saved at step {step} in {checkpoint}", checkpoint, step)
