"""One guard around every run, in Hydra's own callbacks: compose once, validate once, check the inputs once, take
the folder's lock, and only then let the folder exist.

Hydra calls ``RunGuard.on_run_start`` after composing a single run's config and before its ``run_job`` creates the
run folder (``hydra.run.dir``), writes ``.hydra/`` into it and opens ``run.log``. The guard validates the config
(``semvae.config.validate``), refuses an experiment that is a sweep started without ``-m``, runs the task's checks
(``semvae.tasks.checks.check_inputs``: the folder, the machine, the data, checkpoints, exports) and locks the folder,
creating it. A refused run leaves no folder. ``run.py`` then takes the admitted config (``admitted``) instead of
validating again.

A job of a multirun is admitted the same way, in its own folder, by run.py's job function (``admit``): Hydra creates a
job's folder before any callback sees the job's config, so a refused job is recorded there as failed and the sweep
goes on. ``on_multirun_start`` checks and locks the sweep folder before any job starts, and ``on_multirun_end``
releases it.

Hydra turns an ``Exception`` raised in a callback into a warning and carries on, so a refusal leaves a callback as an
``Abort`` (a ``BaseException``, as ``KeyboardInterrupt`` is) carrying the typed error; run.py prints the error as one
line and exits with status 2.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from semvae import rundir
from semvae.config import Config, ConfigError, validate
from semvae.errors import Abort, InputError

log = logging.getLogger(__name__)

_admitted: dict[Path, Config] = {}  # run folder -> its validated, checked config, for the folders this process holds


def task_config(config: DictConfig) -> DictConfig:
    """``config`` without its ``hydra`` node, as Hydra passes it to the task function."""
    cfg = copy.deepcopy(config)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    return cfg


def admit(cfg: DictConfig, run_dir: str | Path) -> Config:
    """Validate ``cfg``, check everything its task needs with ``run_dir`` as the run folder, and lock the folder
    (creating it). Returns the typed config; raises an InputError, with nothing written, otherwise."""
    if Path(run_dir).is_symlink() and not Path(run_dir).exists():
        raise rundir.RunDirError(f"{run_dir} is a link to nothing; name an existing folder or a new path")
    run_dir = Path(run_dir).resolve()
    if run_dir in _admitted:
        return _admitted[run_dir]
    config = validate(OmegaConf.to_object(cfg))
    from semvae.tasks.checks import check_inputs  # imports torch: only once the config validated (seconds)

    rundir.check_free(run_dir)  # a folder in use by another run is not read for the checks below
    check_inputs(config, run_dir)
    rundir.hold(run_dir)
    _admitted[run_dir] = config
    return config


def admitted(run_dir: str | Path) -> Config | None:
    """The config ``admit`` checked for ``run_dir`` in this process, if any."""
    return _admitted.get(Path(run_dir).resolve())


def dismiss(run_dir: str | Path) -> None:
    """Forget ``run_dir``'s admission and release its lock (at the end of its task)."""
    _admitted.pop(Path(run_dir).resolve(), None)
    rundir.release(run_dir)


def check_single_run(config: DictConfig) -> None:
    """ConfigError for a sweep's experiment started as a single run: one of its swept keys is not set on the
    command line, so the run would silently take the experiment's defaults for it."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    given = {o.split("=", 1)[0].lstrip("+~") for o in config.hydra.overrides.task}
    unset = [str(key) for key in params if str(key) not in given]
    if unset:
        experiment = config.hydra.runtime.choices.get("experiment") or "this config"
        raise ConfigError(
            f"experiment={experiment} is a sweep over {', '.join(str(k) for k in params)}: run it with -m "
            f"(python run.py -m experiment={experiment}; its jobs and cost first: python -m semvae.plan "
            f"experiment={experiment}), or set {', '.join(unset)} to run one of its jobs"
        )


def check_hydra_names(config: DictConfig) -> None:
    """ConfigError where Hydra's own names would put its files outside the run folder (``hydra.output_subdir`` and
    ``hydra.job.name`` name a folder and a log file inside it)."""
    from semvae.config import NAME

    for key in ("hydra.output_subdir", "hydra.job.name"):
        value = OmegaConf.select(config, key)
        if value is not None and NAME.fullmatch(str(value).lstrip(".")) is None:
            raise ConfigError(f"{key}={value!r}: must be a name inside the run folder, not a path")


SWEEP_FILES = (rundir.LOCK_FILE, "multirun.yaml", "failures.json", "optimization_results.yaml")


def check_job_dir(job_dir: Path) -> None:
    """RunDirError for a job folder of an existing sweep that a job of it cannot use: a planted link, or files
    that no run wrote (a job's folder holds ``.hydra/`` from the first time Hydra started it)."""
    rundir.check_links(job_dir)
    entries = [p.name for p in job_dir.iterdir() if p.name != rundir.LOCK_FILE]
    if entries and not (job_dir / ".hydra" / "config.yaml").is_file():
        raise rundir.RunDirError(
            f"{job_dir} holds files that no run wrote ({', '.join(sorted(entries)[:3])}); choose another sweep "
            "folder (hydra.sweep.dir)"
        )


class RunGuard(Callback):
    """Hydra callback (registered in conf/config.yaml): admits a single run before its folder exists, and holds a
    sweep's folder for the sweep's life."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_single_run(config)
            check_hydra_names(config)
            admit(task_config(config), str(config.hydra.run.dir))
        except InputError as error:
            raise Abort(error) from None
        except OSError as error:  # a path the file system refuses (a name too long, a file as a parent folder)
            raise Abort(rundir.RunDirError(f"hydra.run.dir: {error.strerror or error}: {error.filename}")) from None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            if sweep_dir.exists():
                rundir.check_links(sweep_dir)  # a job folder that is a link is refused here (.submitit/ is submitit's)
                for job_dir in (p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                    check_job_dir(job_dir)  # Hydra writes .hydra/ and run.log there before a job is checked
                files = [p.name for p in sweep_dir.iterdir() if not p.is_dir() and p.name not in SWEEP_FILES]
                if files:
                    raise rundir.RunDirError(
                        f"{sweep_dir} holds files that no sweep wrote ({', '.join(sorted(files)[:3])}); choose "
                        "another sweep folder (hydra.sweep.dir)"
                    )
            rundir.hold(sweep_dir)
        except InputError as error:
            raise Abort(error) from None
        except OSError as error:
            raise Abort(rundir.RunDirError(f"hydra.sweep.dir: {error.strerror or error}: {error.filename}")) from None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rundir.release(str(config.hydra.sweep.dir))
