"""``hydra/launcher=local``: the jobs of a multirun in parallel on this machine, each in a process of its own.

At most ``n_jobs`` jobs run at a time, each with ``cores // n_jobs`` torch threads (``runtime.num_threads``
overrides it; ``summary.json`` records it as ``torch_threads``). Because every job has its own process, one that
dies (``kill -9``, the out-of-memory killer) fails alone: its folder gets an ``error.txt`` naming how it ended, the
other jobs go on, and the sweep lists it at the end like any failed job (``semvae.sweep.SweepReport``). A pool of
reused workers (joblib's loky) would abort the whole sweep instead. SIGTERM or Ctrl-C to the sweep is passed on to
the running jobs, which save their checkpoints; no new job starts, and the sweep exits with 128 + the signal.
The stacked launcher runs each stack the same way, in a process of its own; this process never initialises CUDA.
"""

import importlib
import json
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

Job = tuple[int, Sequence[str], DictConfig | None]  # number, overrides, composed config (None: not yet)


@dataclass
class ProcessesLauncherConf:
    _target_: str = "hydra_plugins.semvae_launcher.processes.ProcessesLauncher"
    n_jobs: int = 2  # jobs running at the same time


ConfigStore.instance().store(group="hydra/launcher", name="processes", node=ProcessesLauncherConf, provider="semvae")


class ProcessesLauncher(Launcher):
    def __init__(self, n_jobs: int = 2) -> None:
        if n_jobs < 1:
            raise ValueError(f"hydra.launcher.n_jobs={n_jobs}: must be >= 1")
        self.n_jobs = n_jobs
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        sweep_dir = self.prepare()
        log.info(f"Launching {len(job_overrides)} jobs in {sweep_dir}, {self.n_jobs} at a time in their own processes")
        results = self.run_jobs(list(enumerate(job_overrides, start=initial_job_idx)))
        return [results[i] for i in sorted(results)]

    def prepare(self) -> Path:
        """Hydra's globals and the launcher's logging, and the sweep folder (returned), as every launch needs them."""
        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        return sweep_dir

    def run_jobs(self, jobs: list[tuple[int, Sequence[str]]]) -> dict[int, JobReturn]:
        """Run the numbered jobs ``(number, overrides)``, ``n_jobs`` at a time; their results by number."""
        return self.run_units([[(idx, overrides, None)] for idx, overrides in jobs], self.n_jobs)

    def run_units(self, units: list[list[Job]], slots: int, stacked: bool = False) -> dict[int, JobReturn]:
        """Run ``units`` (one job each, or with ``stacked`` the members of a stack each) in processes of their own,
        ``slots`` at a time; the results of their jobs by number. A unit's config is composed when it starts
        (when None)."""
        if not units:
            return {}
        threads = max(1, (os.cpu_count() or 1) // min(slots, len(units)))
        # every job's optimiser imports torch._dynamo (seconds); imported here once, each forked job inherits it
        importlib.import_module("torch._dynamo")
        # fork: the job processes inherit the task function and the composed configs as they are in memory. This
        # process never initialises CUDA (the devices are decided through NVML, ``stacked.device_of``), so the
        # forked jobs can.
        context = multiprocessing.get_context("fork")
        pending = list(units)
        running: dict[Any, tuple[list[Job], Any]] = {}
        results: dict[int, JobReturn] = {}
        stop = _ForwardStops(lambda: [process for _, process in running.values()])
        with stop:
            while pending or running:
                while pending and len(running) < slots and stop.signum is None:
                    unit = [(i, o, c if c is not None else self.job_config(o, i)) for i, o, c in pending.pop(0)]
                    for idx, overrides, _ in unit:
                        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}" + " (stacked)" * stacked)
                    reader, writer = context.Pipe(duplex=False)
                    process = context.Process(target=_run, args=(writer, self, unit, stacked, threads), daemon=False)
                    process.start()
                    writer.close()
                    running[reader] = (unit, process)
                if not running:
                    break
                for reader in wait(list(running)):
                    unit, process = running.pop(reader)
                    try:
                        results.update(reader.recv())
                    except EOFError:  # the process died before it could answer
                        process.join()
                        for idx, overrides, config in unit:
                            results[idx] = self._died(overrides, config, process.exitcode)
                    reader.close()
                    process.join()
        if stop.signum is not None:
            from semvae.stopping import StopRequested
            from semvae.sweep import rerun

            raise StopRequested(stop.signum, f"every job saved what it had; to continue: {rerun(self.config)}")
        return results

    def run_stack(self, stack: list[Job]) -> dict[int, JobReturn]:  # the stacked launcher's
        raise NotImplementedError

    def job_config(self, overrides: Sequence[str], idx: int) -> DictConfig:
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config.hydra.job):
            config.hydra.job.id = f"{config.hydra.job.name}_{idx}"
            config.hydra.job.num = idx
        return config

    def _died(self, overrides: Sequence[str], config: DictConfig, exitcode: int | None) -> JobReturn:
        from semvae.sweep import record_failure

        if exitcode is not None and exitcode < 0:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        else:
            how = f"exited with status {exitcode} without a result"
        job_dir = Path(str(config.hydra.sweep.dir)) / str(OmegaConf.select(config, "hydra.sweep.subdir"))
        objectives = config.get("objectives")
        summary = job_dir / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("status") == "stopped":  # by a stop signal
            return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value={"status": "stopped"})
        error = RuntimeError(f"the job's process {how}; what it saved (last.pt) is kept in {job_dir}")
        log.error("job %s: %s", config.hydra.job.num, error)
        record_failure(job_dir, error)
        value = [float("nan")] * len(objectives) if objectives else {"status": "failed", "error": str(error)}
        return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=value)


def _run(writer, launcher: ProcessesLauncher, unit: list[Job], stacked: bool, threads: int) -> None:
    """In the unit's process: run its job as Hydra's own launchers do (or its stack), send the results back."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    for sig in (signal.SIGTERM, signal.SIGINT):  # the sweep's handlers are not the job's
        signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)
    if stacked:
        results = launcher.run_stack(unit)
    else:
        ((idx, _, config),) = unit
        name_log_lines(f"job {config.hydra.job.num}")
        results = {
            idx: run_job(
                hydra_context=launcher.hydra_context,
                task_function=launcher.task_function,
                config=config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        }
    writer.send(results)
    writer.close()


def name_log_lines(job: str) -> None:
    """In a job's process: every log record starts with ``[job N]``, so that the lines of jobs running side by side
    on one terminal can be told apart (the job's own run.log gets the same lines)."""
    make = logging.getLogRecordFactory()

    def named(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        record.msg = f"[{job}] {record.msg}"
        return record

    logging.setLogRecordFactory(named)


class _ForwardStops:
    """While launching: SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 are passed on to the running jobs and no new job starts."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self, processes):
        self.processes, self.signum, self.previous = processes, None, {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.signum = signum
        for process in self.processes():
            if process.pid is not None and process.exitcode is None:
                os.kill(process.pid, signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
