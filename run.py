"""Entry point: compose the Hydra config, check it, run the chosen task.

python run.py variant=semantic                 # train one model
python run.py task=classifier                  # train the feature classifier
python run.py -m loss.beta=1,5 loss.semantic_weight=0,1   # a sweep
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("SEMVAE_ROOT", str(Path(__file__).resolve().parent))
os.environ.setdefault("WANDB_ERROR_REPORTING", "false")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from semvae.checkpoints import CheckpointError  # noqa: E402
from semvae.config import ConfigError, register_configs, unknown_key_message, validate  # noqa: E402
from semvae.data import DataError  # noqa: E402
from semvae.sweep import record_failure  # noqa: E402
from semvae.tasks import TASKS, check_inputs  # noqa: E402
from semvae.train import NonFiniteLossError, StopRequested  # noqa: E402

log = logging.getLogger("run")
register_configs()


def sweep_group(sweep_dir: str) -> str:
    """W&B group of a multirun job: the sweep folder's last two parts (date and time by default)."""
    return "_".join(Path(sweep_dir).parts[-2:])


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | list[float] | None:
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return run_sweep_job(cfg, hc)
    try:
        return run_task(cfg, hc.runtime.output_dir, group=None)
    except (ConfigError, DataError, CheckpointError) as error:
        log.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteLossError as error:
        log.error("%s; the last good checkpoint is kept in %s", error, hc.runtime.output_dir)
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except StopRequested as stopped:
        log.warning("%s", stopped)
        print(f"stopped: {stopped}", file=sys.stderr)
        hand_on(stopped.signum)


def run_task(cfg: DictConfig, run_dir: str, group: str | None) -> dict | list[float]:
    """Run the chosen task; return its summary, or the ``objectives`` values when a sweeper optimises them."""
    config = validate(OmegaConf.to_object(cfg))
    check_inputs(config, run_dir)
    summary = TASKS[config.task.name](config, run_dir, group)
    if config.objectives:
        missing = [k for k in config.objectives if k not in summary]
        if missing:
            raise ConfigError(f"objectives={list(config.objectives)}: not in the run's summary: {', '.join(missing)}")
        return [float(summary[k]) for k in config.objectives]
    return summary


def run_sweep_job(cfg: DictConfig, hc) -> dict | list[float]:
    """One job of a multirun: a failure is written to the job's error.txt and the sweep goes on (SweepReport lists
    the failures at the end); a stop signal still stops the whole process after its checkpoint."""
    try:
        return run_task(cfg, hc.runtime.output_dir, group=sweep_group(hc.sweep.dir))
    except StopRequested as stopped:
        log.warning("%s", stopped)
        hand_on(stopped.signum)
    except Exception as error:  # noqa: BLE001 - any failure of one job is reported, the others go on
        path = record_failure(hc.runtime.output_dir, error)
        log.error("job %s failed: %s: %s (see %s)", hc.job.num, type(error).__name__, error, path)
        if cfg.get("objectives"):  # a sweeper that optimises records the trial as failed
            return [float("nan")] * len(cfg.objectives)
        return {"status": "failed", "error": f"{type(error).__name__}: {error}"}


def hand_on(signum: int) -> None:
    """After the checkpoint is written, pass a stop signal to whoever handled it before us (submitit requeues a
    preempted SLURM job there); with nobody there, exit with the shell's code for that signal."""
    previous = signal.getsignal(signum)
    if callable(previous):
        signal.raise_signal(signum)
    raise SystemExit(128 + signum)


def check_override_keys(args: list[str]) -> None:
    """Reject a misspelt key before Hydra starts, listing the keys allowed where it went wrong."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = tuple(p.name for p in (Path(__file__).parent / "conf").iterdir() if p.is_dir()) + ("hydra",)
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except Exception:  # noqa: BLE001 - a syntax error is Hydra's to report
        return
    for override in overrides:
        if override.is_add() or override.is_delete() or override.package is not None:
            continue
        message = unknown_key_message(override.key_or_group, groups)
        if message is not None:
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(2)


if __name__ == "__main__":
    check_override_keys(sys.argv[1:])
    main()
