"""task=train_classifier: train the feature classifier phi (``classifier=classifier``), the held-out ResNet judge
(``classifier=judge``) or a judge of another architecture family (``classifier=mlp``, ``classifier=cnn``), report its
test accuracy and export it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from semvae import checkpoints
from semvae.config import Config, as_plain
from semvae.data import random_shift
from semvae.models import build_classifier
from semvae.tasks.checks import effective_config
from semvae.tasks.common import finish_training, setup, test_data, tracked_training, training_data
from semvae.tracking import Tracker
from semvae.training import mean_terms


def train_classifier(cfg: Config, run_dir: str | Path, group: str | None = None) -> dict[str, Any]:
    """Train the classifier of ``classifier.*`` (with ``classifier.seed`` when set) and return its summary."""
    run_dir = Path(run_dir)
    cfg = effective_config(cfg)
    c = cfg.classifier
    device = setup(cfg)
    train, val = training_data(cfg, device)
    model = build_classifier(c.arch.value, c.widths, c.blocks).to(device)
    if cfg.runtime.channels_last:
        model.to(memory_format=torch.channels_last)

    def step_fn(net: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        x = random_shift(x, c.augment_shift) if c.augment_shift else x
        return {"loss": F.cross_entropy(net(x), y)}

    def eval_fn(net: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        logits = net(x)
        return {"loss": F.cross_entropy(logits, y), "accuracy": (logits.argmax(1) == y).float().mean()}

    architecture = {"arch": c.arch.value, "widths": list(c.widths), "blocks": c.blocks}
    architecture["feature_dim"] = model.feature_dim
    extra = {"variant": "classifier", "classifier": c.name, "n_train": len(train), "n_val": len(val)}
    made_by = checkpoints.provenance(cfg.paths.root_dir)  # the tree the run started from, as for the VAE

    def run(tracker: Tracker, fit) -> dict[str, Any]:
        result = fit(model, train, val, step_fn, eval_fn, monitor="accuracy", monitor_mode="max")
        test = test_data(cfg, device)
        test_metrics = mean_terms(model, test, eval_fn, cfg.trainer.batch_size, cfg.trainer.limit_eval_batches)
        extra.update({f"test/{k}": v for k, v in test_metrics.items()})
        model_file = {
            "model": model.state_dict(),
            "kind": "classifier",
            "architecture": architecture,
            "config": as_plain(cfg),
            **extra,
            **made_by,
        }
        return finish_training(cfg, tracker, result, model_file, extra)

    return tracked_training(cfg, run_dir, group, "classifier", extra, {"architecture": architecture}, run)
