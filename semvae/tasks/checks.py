"""Checks a task runs before any work: the run folder is free of links and of other runs' files, the machine has
what the config asks for, the inputs it needs exist and are what they claim (the data and its sizes included), a
checkpoint it would continue was written with the same settings, and a file it would export is not overwritten
unasked.

Each raises an ``InputError`` (``ConfigError``, ``DataError``, ``CheckpointError``, ``RunDirError``) with a message
that names the key or the file; ``semvae.guard`` runs them before a run's folder exists.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from semvae import checkpoints, rundir
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


_MISSING = object()  # a key a stored config lacks


def _lookup(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part, _MISSING) if isinstance(tree, dict) else _MISSING
    return tree


def _leaves(value: Any, key: str) -> dict[str, Any]:
    """{"loss": {"beta": 1}} under "loss" -> {"loss.beta": 1}: the settings a refusal names one by one."""
    if value is _MISSING:
        return {}
    if not isinstance(value, dict) or not value:
        return {key: value}
    return {k: v for name, sub in value.items() for k, v in _leaves(sub, f"{key}.{name}").items()}


def check_resumable(cfg: Config, path: Path) -> dict[str, Any]:
    """The checkpoint ``path`` if this config may continue it; CheckpointError naming the file and, key by key,
    the settings that differ (``loss.semantic_weight: 10.0 -> 0.0``) if not. A setting the checkpoint's config
    lacks (added to the project since) is taken at its default."""
    state = checkpoints.load_training_state(path)
    differing = differing_settings(state.get("config", {}), cfg)
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


def stored_settings(run_dir: Path) -> dict[str, Any] | None:
    """The settings of the run whose files ``run_dir`` holds: its ``config.json``, else the task config Hydra saved
    in ``.hydra/config.yaml``; None when it holds neither."""
    config_json, hydra_yaml = run_dir / "config.json", run_dir / ".hydra" / "config.yaml"
    try:
        if config_json.is_file():
            stored = json.loads(config_json.read_text())
            if isinstance(stored, dict):
                return stored
        if hydra_yaml.is_file():
            from omegaconf import OmegaConf

            stored = OmegaConf.to_container(OmegaConf.load(hydra_yaml), resolve=False)
            if isinstance(stored, dict):
                return stored
    except Exception as error:  # noqa: BLE001 - OSError, JSON's and OmegaConf's parse errors, RecursionError
        raise rundir.RunDirError(
            f"{run_dir} holds a damaged run record ({type(error).__name__}); choose another run folder (hydra.run.dir)"
        ) from None
    return None


def differing_settings(stored: dict[str, Any], cfg: Config) -> list[str]:
    """``key: then -> now`` for each setting of ``RESUME_KEYS`` (and the task) in which ``stored`` differs from
    ``cfg``; a setting ``stored`` lacks (added to the project since) counts as its default."""
    current = as_plain(effective_config(cfg))
    defaults = as_plain(Config())
    if _lookup(stored, "task.name") == TaskName.train_classifier.value and isinstance(
        _lookup(stored, "classifier.seed"), int
    ):  # as effective_config: a record saved before it was applied (.hydra/config.yaml)
        stored = stored | {"seed": _lookup(stored, "classifier.seed")}
    differing = []
    for key in ("task.name", *RESUME_KEYS):
        then, now = _leaves(_lookup(stored, key), key), _leaves(_lookup(current, key), key)
        # a setting added after the checkpoint was written counts as its default (what that run ran with)
        then |= {k: v for k, v in _leaves(_lookup(defaults, key), key).items() if k not in then and k in now}
        changed = [k for k in sorted(then | now) if then.get(k) != now.get(k)]
        differing += [f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in changed]
    return differing


def check_run_dir(cfg: Config, run_dir: str | Path) -> None:
    """RunDirError unless ``run_dir`` is new, empty, or this run's own folder (an earlier attempt of the same
    settings, to resume or finish): a folder holding a planted link, files no run wrote, or the files of a run with
    other settings is refused, and nothing in it is touched."""
    run_dir = Path(run_dir)
    if not os.path.lexists(run_dir):
        return
    if not run_dir.is_dir():
        raise rundir.RunDirError(f"{run_dir} is a file, not a folder; choose another run folder (hydra.run.dir)")
    rundir.check_links(run_dir)
    entries = sorted(p.name for p in run_dir.iterdir() if p.name != rundir.LOCK_FILE)
    if not entries:
        return
    stored = stored_settings(run_dir)
    if stored is None:
        raise rundir.RunDirError(
            f"{run_dir} holds files that no run wrote ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''})"
            "; a run uses a new folder or its own: choose another run folder (hydra.run.dir)"
        )
    differing = differing_settings(stored, cfg)
    if differing:
        raise rundir.RunDirError(
            f"{run_dir} holds another run's files (settings differ: {'; '.join(differing)}); a run continues only "
            "its own folder: choose another run folder (hydra.run.dir) or that run's settings"
        )


def usable_cores() -> int:
    """The cores this process may run on (a SLURM job's or a container's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_machine(cfg: Config) -> None:
    """ConfigError where the config asks the machine for what it lacks: more threads than its cores (torch crashes
    on absurd counts), a CUDA device where there is none."""
    threads, cores = cfg.runtime.num_threads, usable_cores()
    if threads is not None and threads > cores:
        raise ConfigError(
            f"runtime.num_threads={threads}: at most {cores}, the cores this process may use here "
            "(or null for torch's default)"
        )
    device = cfg.runtime.device
    if device.startswith("cuda"):
        import torch

        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available():
            raise ConfigError(f"runtime.device={device!r}: no CUDA device is available here; use auto or cpu")
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"runtime.device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )


def check_data(cfg: Config) -> None:
    """The splits a task reads are there (fetched where data.download allows) and read; and the sizes that depend
    on them fit: DataError or ConfigError naming the key otherwise."""
    from semvae.data import load_split

    d, name = cfg.data, cfg.data.name.value
    trains = cfg.task.name in (TaskName.train_vae, TaskName.train_classifier, TaskName.reproduce)
    judged = cfg.task.name in (TaskName.evaluate, TaskName.reproduce) or (
        cfg.task.name == TaskName.train_vae and cfg.task.evaluate
    )
    if trains:
        n = len(load_split(name, d.root, train=True, download=d.download, mirror=d.mirror))
        if not 1 <= d.val_size < n:
            raise ConfigError(f"data.val_size={d.val_size}: must be in [1, {n - 1}] for the {n} {name} training images")
        n_train = n - d.val_size
        if cfg.trainer.batch_size > n_train:
            raise ConfigError(
                f"trainer.batch_size={cfg.trainer.batch_size}: at most {n_train}, the {name} training images left "
                f"after data.val_size={d.val_size}"
            )
    if judged:
        e = cfg.evaluation
        n_test = len(load_split(name, d.root, train=False, download=d.download, mirror=d.mirror))
        usable = min(n_test, e.limit_test) if e.limit_test is not None else n_test
        if e.n_points > usable:
            limit = f" (evaluation.limit_test={e.limit_test})" if e.limit_test is not None else ""
            raise ConfigError(
                f"evaluation.n_points={e.n_points}: at most {usable}, the {name} test images evaluated{limit}"
            )


def check_inputs(cfg: Config, run_dir: str | Path | None = None) -> None:
    """Fail before any work on a run folder this run may not use, a machine that lacks what the config asks for,
    missing or unfitting data, a missing input, a checkpoint this run cannot continue, or an export that would
    overwrite a file or cannot be written."""
    if run_dir is not None:
        check_run_dir(cfg, run_dir)
    check_machine(cfg)
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
                    f"{key}: not found: {', '.join(missing)}. Train it first (docs/configuration.md), point {key} at "
                    "an existing file, or drop its judge from evaluation.judges"
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
        check_writable("task.export", export)  # first: a name too long for the file system cannot even be stat'ed
        if Path(export).is_dir():
            raise ConfigError(
                f"task.export={export!r} is a folder; name the model file to write, e.g. {export}/model.pth"
            )
        if Path(export).exists() and not cfg.task.overwrite and not exported_by(run_dir, export):
            raise ConfigError(export_exists(cfg, export))
    check_data(cfg)


def export_exists(cfg: Config, export: str) -> str:
    """The refusal to overwrite an export, naming the key the user sets: a classifier's export is its
    ``classifier.checkpoint`` (task=train_classifier exports there by default), a VAE's is ``task.export``."""
    if cfg.task.name == TaskName.train_classifier:
        return (
            f"classifier.checkpoint={export!r} exists (task=train_classifier writes there; the shipped VAEs and "
            "results read it); write elsewhere with classifier.checkpoint=outputs/classifier.pth, or pass "
            "task.overwrite=true to replace it"
        )
    return f"task.export={export!r} exists; pass task.overwrite=true to replace it, or export elsewhere"
