"""What every task shares: the runtime set-up, the data, W&B tracking around a training, the final export."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semvae import checkpoints, runtime
from semvae.config import Config, as_plain
from semvae.data import Split, load_split, train_val_split
from semvae.stopping import StopFlag, StopRequested
from semvae.tasks.checks import exported_by, resume_checkpoint
from semvae.tracking import Tracker
from semvae.training import FitResult, Trainer, stacking, standard_callbacks

log = logging.getLogger(__name__)


def setup(cfg: Config, seed: bool = True) -> torch.device:
    """runtime.*: threads, device, precision check; and the run's seed."""
    rt = cfg.runtime
    return runtime.setup(rt.device, rt.num_threads, rt.precision.value, cfg.seed if seed else None)


def training_data(cfg: Config, device: torch.device) -> tuple[Split, Split]:
    """The training and validation splits of data.*, on ``device``."""
    d = cfg.data
    full = load_split(d.name.value, d.root, train=True, download=d.download, mirror=d.mirror)
    train, val = train_val_split(full, d.val_size, d.split_seed)
    log.info("%s: %d training and %d validation images on %s", d.name.value, len(train), len(val), device)
    return train.to(device), val.to(device)


def test_data(cfg: Config, device: torch.device) -> Split:
    d = cfg.data
    return load_split(d.name.value, d.root, train=False, download=d.download, mirror=d.mirror).to(device)


def load_classifier(cfg: Config, device: torch.device) -> nn.Module:
    """The frozen feature extractor phi from ``classifier.checkpoint``, checked against ``classifier.*``."""
    c = cfg.classifier
    model, _ = checkpoints.load_classifier(c.checkpoint, device, c.expected_architecture())
    return model


def make_tracker(
    cfg: Config, run_dir: Path, job_type: str, group: str | None, extra: dict[str, Any], run_id: str | None = None
) -> Tracker:
    lg = cfg.logger
    return Tracker(
        run_dir,
        config=as_plain(cfg) | extra,
        mode=lg.mode.value,
        project=lg.project,
        name=cfg.name,
        group=lg.group or group,
        job_type=job_type,
        entity=lg.entity,
        tags=list(lg.tags),
        log_artifacts=lg.log_artifacts,
        init_timeout=lg.init_timeout,
        run_id=run_id,
    )


def tracked_training(
    cfg: Config,
    run_dir: Path,
    group: str | None,
    job_type: str,
    extra: dict[str, Any],
    checkpoint_extra: dict[str, Any],
    run: Callable[[Tracker, Callable[..., FitResult]], dict[str, Any]],
) -> dict[str, Any]:
    """Start tracking (continuing the W&B run of the checkpoint being resumed), call ``run(tracker, fit)`` and close
    tracking whatever happens; a stop signal becomes a checkpoint-and-exit with the summary saying so.

    ``fit(model, train, val, step_fn, eval_fn, image_fn=None, **options)`` trains with the configured Trainer and
    the standard callbacks, continuing the run dir's checkpoint (or ``trainer.resume``) when there is one."""
    resume = resume_checkpoint(cfg, run_dir)
    run_id = checkpoints.load(resume).get("wandb_id") if resume is not None else None
    tracker = make_tracker(cfg, run_dir, job_type=job_type, group=group, extra=extra, run_id=run_id)
    checkpoint_extra = checkpoint_extra | {"config": as_plain(cfg), "wandb_id": tracker.run_id}
    t = cfg.trainer
    try:
        with StopFlag() as stop:

            def fit(model, train, val, step_fn, eval_fn, image_fn=None, **options) -> FitResult:
                callbacks = standard_callbacks(
                    run_dir, tracker, t.checkpoint_every, t.progress, image_fn, checkpoint_extra
                )
                precision = cfg.runtime.precision.value
                trainer = Trainer(
                    model,
                    train,
                    val,
                    step_fn,
                    eval_fn,
                    t,
                    seed=cfg.seed,
                    precision=precision,
                    callbacks=callbacks,
                    stop=stop,
                    **options,
                )
                return stacking.fit(trainer, resume)  # alone, or with the other members of a stack

            summary = run(tracker, fit)
    except StopRequested as stopped:
        tracker.update_summary({"status": "stopped", "stopped_at_step": stopped.step, "stop": str(stopped)})
        tracker.stopped()
        raise
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
    return summary


# the metrics of the final summary line
HEADLINE = (
    "val/loss",
    "val/mse",
    "val/accuracy",
    "test/accuracy",
    "test/mse",
    "test/gsv_norm_train",
    "test/gsv_norm_heldout",
    "test/gsv_norm_morpho",
)


def finish_training(
    cfg: Config, tracker: Tracker, result: FitResult, model_file: dict[str, Any], summary: dict[str, Any]
) -> dict[str, Any]:
    """Write ``model.pth`` and the export if asked, log it as an artifact, write the summary and a one-line report."""
    summary = {
        "status": "finished",
        "torch_threads": torch.get_num_threads(),
        "epochs": result.epochs,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        "best_epoch": result.best_epoch,
        **{f"val/{k}": v for k, v in result.val.items()},
        **summary,
    }
    final = tracker.run_dir / "model.pth"
    model_file = model_file | {"summary": summary, "run_dir": str(tracker.run_dir.resolve())}
    checkpoints.save_atomic(model_file, final)
    export = cfg.task.export
    if export is not None:
        checkpoints.export(model_file, export, overwrite=cfg.task.overwrite or exported_by(tracker.run_dir, export))
        summary["export"] = str(export)
    tracker.update_summary(summary)
    tracker.log_checkpoint(final, name=cfg.name, metadata={k: v for k, v in summary.items() if k != "export"})
    log.info(
        "done: %s, %d epochs, %d steps in %.1fs; %s; model: %s%s",
        cfg.name,
        result.epochs,
        result.steps,
        result.seconds,
        ", ".join(f"{k}={v:.4g}" for k, v in summary.items() if k in HEADLINE),
        final,
        f" (exported to {cfg.task.export})" if cfg.task.export else "",
    )
    return summary
