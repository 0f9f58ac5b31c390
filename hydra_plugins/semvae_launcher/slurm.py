"""``hydra/launcher=slurm``: submitit's SLURM launcher, ending as every sweep of this project ends.

- A job that ends without a result (cancelled, killed, timed out more than ``max_num_timeout`` times, stopped by a
  signal that does not requeue) is written into its folder's ``error.txt`` with one line saying how it ended; the
  sweep then lists it in ``failures.json`` with the command that reruns it (``semvae.sweep.SweepReport``), instead of
  stopping at submitit's ``UncompletedJobError`` traceback.
- A submission that SLURM refuses (``sbatch: error: ...``: a GPU the cluster lacks, too many CPUs) ends with that
  line and exit status 2, and leaves no sweep folder behind.
- The preemption signal is agreed: SLURM is asked to send submitit's signal (``--signal=USR2@signal_delay_s``;
  ``SUBMITIT_PREEMPT_SIGNAL`` changes it) and the job script exports the same name, so the job requeues on exactly
  what SLURM sends even where a site does not pass the submitting environment on. ``scancel --signal=USR2`` and
  ``scontrol requeue`` checkpoint and requeue; the run continues at the same step.
- submitit sees a job that died without its result only through accounting (``sacct``, slurmdbd); without it a sweep
  waits for such a job forever, so the launcher warns when ``sacct`` does not answer.
"""

import logging
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from omegaconf import OmegaConf, open_dict

from semvae.errors import InputError

log = logging.getLogger(__name__)


class SubmissionRefused(InputError):
    """sbatch refused the sweep's jobs (a partition, a GPU or a time the cluster does not have); nothing is left."""


@dataclass
class SemvaeSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.semvae_launcher.slurm.SlurmLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="semvae_slurm", node=SemvaeSlurmConf, provider="semvae")


class SlurmLauncher(SubmititSlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit
        from submitit.slurm.slurm import SlurmJobEnvironment

        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        new_sweep = not any(p.name not in (".lock", "multirun.yaml") for p in sweep_dir.iterdir())
        submitit_dir = sweep_dir / ".submitit"
        before = set(submitit_dir.iterdir()) if submitit_dir.is_dir() else set()

        params = dict(self.params)
        signal = SlurmJobEnvironment.USR_SIG
        params["setup"] = [*(params.get("setup") or []), f"export SUBMITIT_PREEMPT_SIGNAL={signal}"]
        executor = submitit.AutoExecutor(
            cluster="slurm", folder=params.pop("submitit_folder"), slurm_max_num_timeout=params.pop("max_num_timeout")
        )
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
        _warn_without_accounting()
        log.info(
            f"SLURM sweep in {sweep_dir}: SIG{signal} {params['signal_delay_s']} s before a job's time limit "
            f"checkpoints and requeues it (at most {self.params['max_num_timeout']} time-outs)"
        )
        numbered = list(enumerate(job_overrides, start=initial_job_idx))
        for idx, overrides in numbered:
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        state = Singleton.get_state()
        args = [(list(o), "hydra.sweep.dir", idx, f"job_id_for_{idx}", state) for idx, o in numbered]
        try:
            jobs = executor.map_array(self, *zip(*args, strict=True))
        except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as error:
            _remove_submission(sweep_dir, new_sweep, submitit_dir, before)
            message = next((line for line in str(error).splitlines() if "error" in line), str(error).strip())
            raise SubmissionRefused(f"SLURM refused the sweep's jobs: {message}; nothing was submitted") from None
        return [self._result(job, overrides, idx) for job, (idx, overrides) in zip(jobs, numbered, strict=True)]

    def _result(self, job, overrides: Sequence[str], idx: int) -> JobReturn:
        """The job's JobReturn; a job that ended without one, or whose task raised outside run.py's own handling
        (submitit's UncompletedJobError after too many time-outs), becomes a failed job with its error.txt."""
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            result = job.results()[0]
        except (UncompletedJobError, FailedJobError) as error:
            return self._failed(overrides, idx, f"SLURM job {job.job_id} ended {job.state} without a result", error)
        if result.status == JobStatus.FAILED:
            error = result._return_value
            return self._failed(overrides, idx, f"SLURM job {job.job_id}: {type(error).__name__}: {error}", error)
        return result

    def _failed(self, overrides: Sequence[str], idx: int, how: str, cause: BaseException) -> JobReturn:
        from semvae.sweep import record_failure

        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config.hydra.job):
            config.hydra.job.num = idx
        job_dir = Path(str(config.hydra.sweep.dir)) / str(OmegaConf.select(config, "hydra.sweep.subdir"))
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        if not overrides_file.exists():  # a job cancelled before it started: listed with its overrides all the same
            overrides_file.parent.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(OmegaConf.create(list(overrides)), overrides_file)
        error = RuntimeError(f"{how.splitlines()[0]}; what it saved (last.pt) is kept in {job_dir}")
        error.__cause__ = cause
        log.error("job %s: %s", idx, error)
        record_failure(job_dir, error)
        objectives = config.get("objectives")
        value = [float("nan")] * len(objectives) if objectives else {"status": "failed", "error": str(error)}
        return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=value)


def _remove_submission(sweep_dir: Path, new_sweep: bool, submitit_dir: Path, before: set[Path]) -> None:
    """What a refused submission wrote: the whole sweep folder when this launch made it, else its new submitit
    files only (an earlier sweep's folder keeps its jobs)."""
    if new_sweep:
        shutil.rmtree(sweep_dir, ignore_errors=True)
        return
    for path in set(submitit_dir.iterdir()) - before if submitit_dir.is_dir() else ():
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _warn_without_accounting() -> None:
    try:
        answered = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        answered = False
    if not answered:
        log.warning(
            "sacct does not answer (no SLURM accounting, slurmdbd): a job that dies without writing its result "
            "cannot be seen to have ended, and the sweep would wait for it forever"
        )


def submitted_signal(sweep_dir: Path) -> str:
    """The signal SLURM was told to send before a job's time limit, read from the sweep's sbatch script
    (``#SBATCH --signal=USR2@120`` gives ``USR2``)."""
    for script in sorted(Path(sweep_dir, ".submitit").glob("*/*.sh")):
        for line in script.read_text().splitlines():
            if line.startswith("#SBATCH --signal="):
                return line.split("=", 1)[1].split("@")[0]
    raise FileNotFoundError(f"no sbatch script with --signal in {sweep_dir}/.submitit")
