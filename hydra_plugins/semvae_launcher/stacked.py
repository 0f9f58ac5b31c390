"""``hydra/launcher=stacked``: the VAE trainings of a multirun that can share a device train together as one stack.

Jobs that differ only in what a stack member can carry (``seed``, ``name``, ``loss.*``) and train a VAE
(``task=train_vae``) form a stack: one process, one fused optimiser step for all its members per batch
(``semvae/training/stacking.py``). Every member stays an ordinary run in its own job folder (config, metrics,
checkpoints, W&B run, evaluation) and resumes from its own ``last.pt`` when the sweep is run again. Everything else
runs as ordinary jobs in processes of their own, ``n_jobs`` at a time, as ``hydra/launcher=local`` runs them; the
launcher logs how it grouped the jobs.

Stacking pays where one process leaves the device idle (a GPU, bound by kernel launches at this model size). On a
CPU the members' convolutions run no faster together than one after another, so by default jobs that would run on
the CPU are not stacked (``on_cpu``; docs/stacking.md has the measurement). ``compile=true`` runs the stacks' step
under ``torch.compile``.

Every stack, like every job alone, runs in a process of its own, forked from this one; this process decides the
devices without initialising CUDA (through NVML, ``device_of``), because a process that has initialised CUDA
cannot fork processes that use it.
"""

import copy
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, run_job
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from hydra_plugins.semvae_launcher.processes import ProcessesLauncher

log = logging.getLogger(__name__)

CARRIED = ("seed", "name", "loss")  # what may differ between the members of one stack


@dataclass
class StackedLauncherConf:
    _target_: str = "hydra_plugins.semvae_launcher.stacked.StackedLauncher"
    max_members: int = 64  # members per stack; larger groups are split
    on_cpu: bool = False  # stack jobs that run on the CPU too
    n_jobs: int = 2  # jobs that are not stacked: this many at a time, each in its own process
    compile: bool = False  # the stacks' optimiser step under torch.compile
    skip: list = field(default_factory=list)  # names of jobs not to run (finished elsewhere: benchmarks/gpu_window)


ConfigStore.instance().store(group="hydra/launcher", name="semvae_stacked", node=StackedLauncherConf, provider="semvae")


def typed_config(config: DictConfig):
    """The job's validated typed config (``semvae.config.Config``), or None when it does not validate."""
    from semvae.config import validate

    task_cfg = copy.deepcopy(config)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    try:
        return validate(OmegaConf.to_object(task_cfg))
    except Exception:  # noqa: BLE001 - reported by the job itself, in its own process
        return None


def stack_key(config: DictConfig) -> str | None:
    """What the jobs of one stack share (their config without ``CARRIED``), or None for a job that is not stacked:
    another task, a config that does not validate (it fails in its own process, with its own message)."""
    from semvae.config import TaskName, as_plain

    typed = typed_config(config)
    if typed is None or typed.task.name != TaskName.train_vae:
        return None
    shared = {k: v for k, v in as_plain(typed).items() if k not in CARRIED}
    return json.dumps(shared, sort_keys=True, default=str)


def device_of(config: DictConfig) -> str:
    """The device a job runs on (``runtime.device``, with ``auto`` decided as the job will decide it)."""
    name = str(config.runtime.device)
    return ("cuda" if cuda_present() else "cpu") if name == "auto" else name


def cuda_present() -> bool:
    """Whether a CUDA device is visible, asked through NVML (``PYTORCH_NVML_BASED_CUDA_CHECK``), which leaves CUDA
    uninitialised in this process: ``torch.cuda.is_available()`` alone initialises the driver, and the processes
    forked afterwards could not use CUDA ("Cannot re-initialize CUDA in forked subprocess")."""
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    import torch

    return torch.cuda.is_available()


class StackedLauncher(ProcessesLauncher):
    def __init__(
        self, max_members: int = 64, on_cpu: bool = False, n_jobs: int = 2, compile: bool = False, skip=()
    ) -> None:
        super().__init__(n_jobs=n_jobs)
        if max_members < 1:
            raise ValueError(f"hydra.launcher.max_members={max_members}: must be >= 1")
        self.max_members, self.on_cpu, self.compile = max_members, on_cpu, compile
        self.skip = {str(name) for name in skip}

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        sweep_dir = self.prepare()
        stacks, alone, skipped = self.group(list(enumerate(job_overrides, start=initial_job_idx)))
        listed = ", ".join(f"{len(s)} members (jobs {' '.join(str(i) for i, *_ in s)}) on {d}" for d, s in stacks)
        listed = f"{len(stacks)} stack{'s' * (len(stacks) != 1)}" + (f": {listed}" if listed else "")
        if alone:
            listed += f"; {len(alone)} jobs alone, {self.n_jobs} at a time in their own processes"
            if not self.on_cpu and any(device_of(config) == "cpu" for *_, config in alone):
                listed += " (jobs on the CPU run alone unless hydra.launcher.on_cpu=true; docs/benchmarks.md)"
        else:
            listed += "; 0 jobs alone"
        if skipped:
            listed += f"; {len(skipped)} jobs skipped (hydra.launcher.skip)"
        log.info(f"Launching {len(job_overrides)} jobs in {sweep_dir}: {listed}")
        # jobs whose config does not validate first: they fail at once, before the stacks train
        invalid = [(idx, overrides) for idx, overrides, config in alone if typed_config(config) is None]
        results: dict[int, JobReturn] = self.run_jobs(invalid)
        for idx, overrides, _ in skipped:
            results[idx] = JobReturn(list(overrides), status=JobStatus.COMPLETED, _return_value={"status": "skipped"})
        results.update(self.run_units([stack for _, stack in stacks], slots=1, stacked=True))  # one after another
        results.update(self.run_jobs([(idx, overrides) for idx, overrides, _ in alone if idx not in results]))
        return [results[i] for i in sorted(results)]

    def group(self, jobs: list[tuple[int, Sequence[str]]]):
        """Stacks (device, [(number, overrides, config)]) of at least two members, the jobs left alone and the jobs
        skipped."""
        by_key: dict[str, list[tuple[int, Sequence[str], DictConfig]]] = {}
        alone, skipped = [], []
        for idx, overrides in jobs:
            config = self.job_config(overrides, idx)
            if str(config.name) in self.skip:
                skipped.append((idx, overrides, config))
                continue
            key = stack_key(config)
            if key is None or (device_of(config) == "cpu" and not self.on_cpu):
                alone.append((idx, overrides, config))
            else:
                by_key.setdefault(key, []).append((idx, overrides, config))
        stacks = []
        for members in by_key.values():
            for start in range(0, len(members), self.max_members):
                chunk = members[start : start + self.max_members]
                if len(chunk) == 1:
                    alone.extend(chunk)
                else:
                    stacks.append((device_of(chunk[0][2]), chunk))
        alone.sort(key=lambda job: job[0])
        return stacks, alone, skipped

    def run_stack(self, stack: list[tuple[int, Sequence[str], DictConfig]]) -> dict[int, JobReturn]:
        """(in the stack's process) The members of one stack; a stop signal saves every member."""
        from semvae.stopping import StopFlag
        from semvae.training.stacking import run_stacked

        jobs = [
            partial(
                run_job,
                hydra_context=self.hydra_context,
                task_function=self.task_function,
                config=config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
            for _, _, config in stack
        ]
        with StopFlag() as stop:  # installed here, in the main thread; the members' runs share it
            outcomes = run_stacked(jobs, compile=self.compile)
        results = {}
        for (idx, overrides, config), (result, error) in zip(stack, outcomes, strict=True):
            if error is None:
                results[idx] = result
            elif isinstance(error, SystemExit) and stop.signum is not None:
                results[idx] = JobReturn(
                    list(overrides), status=JobStatus.COMPLETED, _return_value={"status": "stopped"}
                )
            else:  # raised outside the task function, so Hydra's run_job could not record it
                results[idx] = self._failed(overrides, config, error)
        return results

    def _failed(self, overrides: Sequence[str], config: DictConfig, error: BaseException) -> JobReturn:
        from semvae.sweep import record_failure

        job_dir = Path(str(config.hydra.sweep.dir)) / str(OmegaConf.select(config, "hydra.sweep.subdir"))
        log.error("job %s: %s: %s", config.hydra.job.num, type(error).__name__, error)
        record_failure(job_dir, error)
        objectives = config.get("objectives")
        value = [float("nan")] * len(objectives) if objectives else {"status": "failed", "error": str(error)}
        return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=value)
