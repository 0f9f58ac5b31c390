"""Checks a task runs before any work: the inputs it needs exist and are what they claim, a checkpoint it would
continue was written with the same settings, and a file it would export is not overwritten unasked.

Each raises ``ConfigError`` or ``CheckpointError`` with a message that names the key or the file.
"""

from __future__ import annotations

import dataclasses
import errno
import tempfile
from pathlib import Path
from typing import Any

from semvae import checkpoints
from semvae.config import CLASSIFIER_JUDGES, Config, ConfigError, JudgeName, TaskName, as_plain

# settings a resumed run must share with the checkpoint it continues (trainer.epochs may grow)
RESUME_KEYS = (
    "seed",
    "model",
    "loss",
    "classifier.widths",
    "classifier.blocks",
    "data.name",
    "data.val_size",
    "data.split_seed",
    "trainer.batch_size",
    "trainer.lr",
    "trainer.weight_decay",
    "trainer.lr_schedule",
    "trainer.limit_train_batches",
)


def effective_config(cfg: Config) -> Config:
    """The config a task really runs with: task=train_classifier trains with classifier.seed and for
    classifier.epochs when they are set."""
    if cfg.task.name != TaskName.train_classifier:
        return cfg
    c = cfg.classifier
    if c.epochs is not None:
        cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, epochs=c.epochs))
    return dataclasses.replace(cfg, seed=c.seed) if c.seed is not None else cfg


def resume_checkpoint(cfg: Config, run_dir: str | Path | None) -> Path | None:
    """trainer.resume when set, else the run dir's last.pt when it exists (the same command continues a run)."""
    if cfg.trainer.resume is not None:
        return Path(cfg.trainer.resume)
    if run_dir is not None and (Path(run_dir) / "last.pt").is_file():
        return Path(run_dir) / "last.pt"
    return None


def _lookup(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def _leaves(value: Any, key: str) -> dict[str, Any]:
    """{"loss": {"beta": 1}} under "loss" -> {"loss.beta": 1}: the settings a refusal names one by one."""
    if not isinstance(value, dict) or not value:
        return {key: value}
    return {k: v for name, sub in value.items() for k, v in _leaves(sub, f"{key}.{name}").items()}


def check_resumable(cfg: Config, path: Path) -> dict[str, Any]:
    """The checkpoint ``path`` if this config may continue it; CheckpointError naming the file and, key by key,
    the settings that differ (``loss.semantic_weight: 10.0 -> 0.0``) if not. A setting the checkpoint's config
    lacks (added to the project since) is taken at its default."""
    state = checkpoints.load_training_state(path)
    stored, current = state.get("config", {}), as_plain(effective_config(cfg))
    defaults = as_plain(Config())
    differing = []
    for key in RESUME_KEYS:
        then, now = _leaves(_lookup(stored, key), key), _leaves(_lookup(current, key), key)
        # a setting added after the checkpoint was written counts as its default (what that run ran with)
        then |= {k: v for k, v in _leaves(_lookup(defaults, key), key).items() if k not in then and k in now}
        changed = [k for k in sorted(then | now) if then.get(k) != now.get(k)]
        differing += [f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in changed]
    if differing:
        raise checkpoints.CheckpointError(
            f"{path} was written by a run with other settings ({'; '.join(differing)}); use another run dir "
            "(hydra.run.dir) or the settings it was written with"
        )
    return state


def exported_by(run_dir: str | Path | None, path: str | Path) -> bool:
    """Whether the model file ``path`` was exported by the run in ``run_dir`` (then that run may write it again:
    a run stopped between its export and its summary finishes without task.overwrite)."""
    if run_dir is None:
        return False
    try:
        made_in = checkpoints.load(path).get("run_dir")
    except checkpoints.CheckpointError:
        return False
    return made_in is not None and Path(made_in).resolve() == Path(run_dir).resolve()


def check_writable(key: str, path: str | Path) -> None:
    """ConfigError naming ``key`` if a file cannot be created at ``path``: a name too long for the file system, a
    parent that is a file, or a folder that refuses new files. Nothing is left behind."""
    path = Path(path)
    limit = 255  # NAME_MAX of the usual Linux file systems
    too_long = [part for part in path.parts if len(part.encode()) > limit]
    if too_long:
        raise ConfigError(f"{key}={str(path)!r}: the name {too_long[0][:40]}... is longer than {limit} bytes")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{key}={str(path)!r}: {ancestor} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as error:
        reason = "the folder is read-only" if error.errno in (errno.EROFS, errno.EACCES) else error.strerror
        raise ConfigError(f"{key}={str(path)!r}: cannot write in {ancestor}: {reason}") from None


def check_inputs(cfg: Config, run_dir: str | Path | None = None) -> None:
    """Fail before any work on a missing input, a checkpoint this run cannot continue, or an export that would
    overwrite a file."""
    if cfg.trainer.resume is not None and not Path(cfg.trainer.resume).is_file():
        raise ConfigError(f"trainer.resume={cfg.trainer.resume!r}: no such checkpoint")
    if cfg.task.name in (TaskName.train_vae, TaskName.train_classifier):
        resume = resume_checkpoint(cfg, run_dir)
        if resume is not None:
            check_resumable(cfg, resume)
    if (
        cfg.task.name == TaskName.train_vae
        and cfg.loss.semantic_weight > 0
        and not Path(cfg.classifier.checkpoint).is_file()
    ):
        raise ConfigError(
            f"classifier.checkpoint={cfg.classifier.checkpoint!r} does not exist, and the semantic loss "
            f"(loss.semantic_weight={cfg.loss.semantic_weight}) needs it: train it first with "
            "`python run.py task=train_classifier`, or point classifier.checkpoint at one"
        )
    if cfg.task.name == TaskName.evaluate or (cfg.task.name == TaskName.train_vae and cfg.task.evaluate):
        e = cfg.evaluation
        needed = {"evaluation.checkpoints": e.checkpoints} if cfg.task.name == TaskName.evaluate else {}
        for judge in e.judges:  # the classifier judges' files (train: classifier.checkpoint, checked below)
            if judge.value in CLASSIFIER_JUDGES:
                key = CLASSIFIER_JUDGES[judge.value]
                needed[key] = [_lookup(as_plain(cfg), key)]
        for key, paths in needed.items():
            missing = [p for p in paths if not Path(p).is_file()]
            if missing and key == "evaluation.checkpoints":
                raise ConfigError(f"{key}: not found: {', '.join(missing)}. List existing VAE model files")
            if missing:
                raise ConfigError(
                    f"{key}: not found: {', '.join(missing)}. Train it first (README, 'Run'), point {key} at an "
                    "existing file, or drop its judge from evaluation.judges"
                )
        for path in needed.get("evaluation.checkpoints", []):  # safe to load, and a VAE
            checkpoints.load_vae(path)
        for key, paths in needed.items():  # safe to load, and a classifier of its stored architecture
            if key.startswith("evaluation.") and key != "evaluation.checkpoints":
                checkpoints.load_classifier(paths[0])
    judged = cfg.task.name == TaskName.evaluate or (cfg.task.name == TaskName.train_vae and cfg.task.evaluate)
    if (judged and JudgeName.train in cfg.evaluation.judges) or (
        cfg.task.name == TaskName.train_vae and cfg.loss.semantic_weight > 0
    ):
        c = cfg.classifier  # safe to load, and the configured architecture
        checkpoints.load_classifier(c.checkpoint, expect=c.expected_architecture())
    export = cfg.task.export
    if export is not None:
        check_writable("task.export", export)
        if Path(export).exists() and not cfg.task.overwrite and not exported_by(run_dir, export):
            raise ConfigError(f"task.export={export!r} exists; pass task.overwrite=true to replace it")
