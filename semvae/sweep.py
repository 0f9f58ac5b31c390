"""Sweeps: a failing job is recorded in its own folder, the others go on, and the sweep ends with the list.

run.py writes ``error.txt`` into a multirun job's folder when the job fails, instead of stopping the process;
``SweepReport`` (a Hydra callback, registered in conf/config.yaml) lists those jobs when the multirun ends,
writes them to ``failures.json`` in the sweep folder and ends the command with ``SweepFailed`` (exit status 1).
"""

from __future__ import annotations

import json
import logging
import shlex
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from semvae.errors import Abort, SweepFailed

log = logging.getLogger(__name__)


def record_failure(job_dir: str | Path, error: BaseException) -> Path:
    """Write what went wrong into the job's folder, for the report and for the researcher."""
    path = Path(job_dir) / "error.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    path.write_text(f"{type(error).__name__}: {error}\n\n{text}")
    return path


def clear_failure(job_dir: str | Path) -> None:
    """Remove the error.txt of an earlier attempt of a job that has now succeeded."""
    (Path(job_dir) / "error.txt").unlink(missing_ok=True)


def failed_jobs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Jobs of a sweep folder that left an error.txt: their folder, overrides and error line."""
    failures = []
    for error_file in sorted(Path(sweep_dir).glob("*/error.txt"), key=lambda p: _job_number(p.parent)):
        job_dir = error_file.parent
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = []
        if overrides_file.exists():
            overrides = [line[2:].strip() for line in overrides_file.read_text().splitlines() if line.startswith("- ")]
        failures.append(
            {
                "job": job_dir.name,
                "dir": str(job_dir),
                "overrides": overrides,
                "error": error_file.read_text().splitlines()[0],
            }
        )
    return failures


def rerun(config: DictConfig) -> str:
    """The command that runs this sweep again in its own folder."""
    overrides = [o for o in config.hydra.overrides.hydra if not o.startswith("hydra.sweep.dir=")]
    args = [*config.hydra.overrides.task, *overrides, f"hydra.sweep.dir={config.hydra.sweep.dir}"]
    return "python run.py -m " + " ".join(shlex.quote(a) for a in args)


def _job_number(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, path.name)


class SweepReport(Callback):
    """Hydra callback: at the end of a multirun, list the failed jobs, say how to rerun them in place, and end the
    command with SweepFailed if there are any (the sweep folder's lock is ``semvae.guard.RunGuard``'s)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()] if sweep_dir.is_dir() else []
        failures = failed_jobs(sweep_dir)
        report = sweep_dir / "failures.json"
        if not failures:
            report.unlink(missing_ok=True)  # from an earlier run of this sweep
            log.info("sweep finished: all %d jobs succeeded (%s)", len(jobs), sweep_dir)
            return
        report.write_text(json.dumps(failures, indent=2))
        lines = [f"{len(failures)} of {len(jobs)} jobs failed (details in {sweep_dir / 'failures.json'}):"]
        lines += [f"  job {f['job']} [{' '.join(f['overrides'])}]: {f['error']}" for f in failures]
        lines.append(f"to run them again in place (finished jobs are kept, stopped ones continue): {rerun(config)}")
        log.error("\n".join(lines))
        raise Abort(SweepFailed(f"{len(failures)} of {len(jobs)} jobs failed; see {report}"))
