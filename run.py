"""Entry point: compose the Hydra config, check it, run the chosen task.

python run.py variant=semantic                 # train one model
python run.py task=train_classifier            # train the feature classifier
python run.py -m loss.beta=1,5 loss.semantic_weight=0,1   # a sweep
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import sys
from pathlib import Path

os.environ.setdefault("SEMVAE_ROOT", str(Path(__file__).resolve().parent))
os.environ.setdefault("WANDB_ERROR_REPORTING", "false")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

# torch-free imports only: a config that does not validate is refused before torch is imported (seconds)
from semvae import guard, rundir  # noqa: E402
from semvae.config import ConfigError, register_configs, unknown_key_message  # noqa: E402
from semvae.errors import Abort, InputError, SweepFailed  # noqa: E402
from semvae.stopping import StopFlag, StopRequested  # noqa: E402
from semvae.sweep import clear_failure, record_failure  # noqa: E402

log = logging.getLogger("run")
register_configs()
rundir.register_resolver()

CONF = Path(__file__).resolve().parent / "conf"


def sweep_group(sweep_dir: str) -> str:
    """W&B group of a multirun job: the sweep folder's last two parts (date and time by default)."""
    return "_".join(Path(sweep_dir).parts[-2:])


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | list[float] | None:
    from semvae.training import NonFiniteLossError

    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return run_sweep_job(cfg, hc)
    try:
        return run_task(cfg, hc.runtime.output_dir, group=None)
    except InputError as error:
        fail(error, status=2)
    except NonFiniteLossError as error:  # its message says which checkpoint, if any, is kept
        fail(error, status=1)
    except OSError as error:  # a full disk, a folder that cannot be written: the message names the file
        fail(error, status=1)
    except StopRequested as stopped:
        log.warning("%s", stopped)
        print(f"stopped: {stopped}\nto continue: {resume_command(hc, cfg)}", file=sys.stderr)
        hand_on(stopped.signum)


def fail(error: BaseException, status: int) -> None:
    """One line on stderr (``error: ...``) and the same in the run's log file, not twice on the terminal."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (error,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(status) from None


def resume_command(hc, cfg: DictConfig | None = None) -> str:
    """The command that continues this run: its overrides, with the run dir named and, unless given, the data
    folder it read (``data.root=``, absolute), so that it works from a new shell without SEMVAE_DATA_DIR."""
    hydra_overrides = [o for o in hc.overrides.hydra if not o.startswith(("hydra.run.dir=", "hydra.mode="))]
    data = []
    if cfg is not None and not any(o.startswith("data.root=") for o in hc.overrides.task):
        data = [f"data.root={Path(str(cfg.data.root)).resolve()}"]
    args = [*hc.overrides.task, *data, *hydra_overrides, run_dir_override(hc.runtime.output_dir)]
    script = "run.py" if Path.cwd() == Path(__file__).resolve().parent else str(Path(__file__).resolve())
    return f"python {script} " + " ".join(shlex.quote(a) for a in args)


def run_dir_override(path: str) -> str:
    """``hydra.run.dir=PATH``, quoted for Hydra's override parser where the path needs it."""
    if re.fullmatch(r"[\w/.\-+@~%]+", str(path)):
        return f"hydra.run.dir={path}"
    quoted = str(path).replace("\\", "\\\\").replace("'", "\\'")
    return f"hydra.run.dir='{quoted}'"


def run_task(cfg: DictConfig, run_dir: str, group: str | None) -> dict | list[float]:
    """Run the chosen task in its run dir, admitted by ``semvae.guard`` (already, for a single run, before Hydra made
    the folder; here, for a sweep's job), turning stop signals into a checkpoint-and-exit; return its summary, or
    the ``objectives`` values when a sweeper optimises them."""
    config = guard.admitted(run_dir) or guard.admit(cfg, run_dir)
    from semvae.tasks import TASKS

    try:
        with StopFlag():
            log.info("task=%s name=%s in %s", config.task.name.value, config.name, Path(run_dir).resolve())
            summary = TASKS[config.task.name](config, run_dir, group)
    finally:
        guard.dismiss(run_dir)
    if config.objectives:
        missing = [k for k in config.objectives if k not in summary]
        if missing:
            raise ConfigError(f"objectives={list(config.objectives)}: not in the run's summary: {', '.join(missing)}")
        return [float(summary[k]) for k in config.objectives]
    return summary


def run_sweep_job(cfg: DictConfig, hc) -> dict | list[float]:
    """One job of a multirun: a failure is written to the job's error.txt and the sweep goes on (SweepReport lists
    the failures at the end); a stop signal still stops the whole process after its checkpoint."""
    job_dir = hc.runtime.output_dir
    try:
        summary = run_task(cfg, job_dir, group=sweep_group(hc.sweep.dir))
    except StopRequested as stopped:
        log.warning("%s", stopped)
        hand_on(stopped.signum)
    except rundir.RunDirBusy as error:  # another sweep's job: its folder is left alone
        log.error("job %s not run: %s", hc.job.num, error)
        return failed_job(cfg, error)
    except Exception as error:  # noqa: BLE001 - any failure of one job is reported, the others go on
        path = record_failure(job_dir, error)
        log.error("job %s failed: %s: %s (see %s)", hc.job.num, type(error).__name__, error, path)
        return failed_job(cfg, error)
    clear_failure(job_dir)  # an error.txt of an earlier attempt no longer holds
    return summary


def failed_job(cfg: DictConfig, error: BaseException) -> dict | list[float]:
    if cfg.get("objectives"):  # a sweeper that optimises records the trial as failed
        return [float("nan")] * len(cfg.objectives)
    return {"status": "failed", "error": f"{type(error).__name__}: {error}"}


def hand_on(signum: int) -> None:
    """After everything is saved, pass a stop signal to whoever handled it before us (submitit requeues a
    preempted SLURM job there); with nobody there, exit with the shell's code for that signal."""
    previous = signal.getsignal(signum)
    if callable(previous) and previous is not signal.default_int_handler:
        signal.raise_signal(signum)
    raise SystemExit(128 + signum)


def refuse(message: object) -> None:
    """Refuse the run: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2) from None


def composition_error(error: Exception) -> str:
    """Hydra's multi-line composition error as one line: ``variant=semantik: no such option; available: beta,
    semantic, vae`` or ``loss.beta=abc: Value 'abc' of type 'str' could not be converted to Float``."""
    text = str(error)
    missing = re.search(r"Could not (?:find|load) '([^']+)'", text)
    if missing:
        group, _, option = missing.group(1).rpartition("/")
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        listed = f"; available: {', '.join(options)}" if options else ""
        return f"{group}={option}: no such option{listed}" if group else text.splitlines()[0]
    override = re.search(r"Error merging override (\S+)", text)
    cause = str(error.__cause__ or "").strip().splitlines()
    if override and cause:
        return f"{override.group(1)}: {cause[0]}"
    return text.strip().splitlines()[0]


def check_override_keys(args: list[str]) -> None:
    """Reject a misspelt key before Hydra starts, listing the keys allowed where it went wrong."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = tuple(p.name for p in (Path(__file__).parent / "conf").iterdir() if p.is_dir()) + ("hydra",)
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except Exception:  # noqa: BLE001 - a syntax error is Hydra's to report
        return
    for override in overrides:
        if override.is_delete() or override.package is not None:
            continue
        message = unknown_key_message(override.key_or_group, groups)
        if message is not None:
            refuse(message)


def check_sweep_flags(args: list[str]) -> None:
    """``-m`` with ``--cfg``: Hydra 1.3 ends that in a ValueError traceback; say instead where a sweep's plan is."""
    asks_cfg = [a for a in args if a in ("--cfg", "-c") or a.startswith("--cfg=") or a in ("-cjob", "-chydra", "-call")]
    if not any(a in ("-m", "--multirun") for a in args) or not asks_cfg:
        return
    skip = {i + 1 for i, a in enumerate(args) if a in ("--cfg", "-c")}  # the value of ``--cfg job``
    overrides = [a for i, a in enumerate(args) if i not in skip and not a.startswith("-")]
    refuse(
        "--cfg shows one job's config, not a sweep's; the sweep's jobs, their grouping and cost: "
        f"python -m semvae.plan {' '.join(shlex.quote(a) for a in overrides)}"
    )


def reported(call):
    """``call()``, with a refusal from a Hydra callback (semvae.guard) or from Hydra's composition as one line on
    stderr and exit status 2, and a sweep's failed jobs (SweepReport) as exit status 1."""
    from hydra.errors import CompactHydraException

    try:
        return call()
    except Abort as abort:
        if isinstance(abort.error, SweepFailed):
            print(f"error: {abort.error}", file=sys.stderr)
            raise SystemExit(1) from None
        refuse(abort.error)
    except CompactHydraException as error:  # an unknown option, a wrong type, an override that does not parse
        refuse(composition_error(error))
    except InputError as error:  # raised by a launcher (SLURM refusing a submission, say)
        refuse(error)
    except StopRequested as stopped:  # a launcher stopped by a signal once its jobs saved what they had
        log.warning("%s", stopped)
        print(f"stopped: {stopped}", file=sys.stderr)
        raise SystemExit(128 + stopped.signum) from None


def cli() -> None:
    """``python run.py ...``: Hydra's app, with every refusal as one line and an exit status instead of a
    traceback; nothing is written for a refused run."""
    check_sweep_flags(sys.argv[1:])
    check_override_keys(sys.argv[1:])
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's own errors reach ``reported``, not its traceback printer
    reported(main)


if __name__ == "__main__":
    cli()
