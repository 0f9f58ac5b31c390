"""Sweeps through ``hydra/launcher=slurm`` on a real SLURM scheduler: the one-node cluster of tests/slurm/cluster.sh
(Debian's packages, started here as root if it is not running; every test is skipped, with the reason, where it
cannot start). Marked ``slurm``: ``python -m pytest`` leaves them out, ``python -m pytest -m slurm`` runs them
(.ci/run does, after starting the cluster). docs/cluster.md runs the same commands."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from hydra_plugins.semvae_launcher.slurm import submitted_signal
from semvae import checkpoints
from tests.conftest import DATA_DIR, ROOT, read_summary
from tests.test_faults import LONG, uninterrupted  # noqa: F401 - the fixture, shared with test_faults
from tests.test_sweeps import TINY, TINY_EVAL, _jobs

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"


@pytest.fixture(scope="module")
def slurm_env():
    """The environment of a run.py that submits to the test cluster (started here, and stopped again, if it was not
    running)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("the test cluster needs root on Linux (sudo tests/slurm/cluster.sh start)")
    was_up = subprocess.run([CLUSTER, "status"], capture_output=True).returncode == 0
    started = subprocess.run([CLUSTER, "start"], capture_output=True, text=True, timeout=300)
    if started.returncode != 0:
        pytest.skip(f"the SLURM test cluster did not start: {started.stderr.strip().splitlines()[-1:]}")
    conf = subprocess.run([CLUSTER, "env"], capture_output=True, text=True, check=True).stdout.split("=", 1)[1]
    env = os.environ | {
        "SLURM_CONF": conf.strip(),
        "SEMVAE_DATA_DIR": str(DATA_DIR),
        "WANDB_MODE": "offline",
        "WANDB_ERROR_REPORTING": "false",
        "HYDRA_FULL_ERROR": "0",
    }
    yield env
    if not was_up:
        subprocess.run([CLUSTER, "stop"], capture_output=True, timeout=120)


def _sweep(env, *overrides, wait=True):
    command = [sys.executable, str(ROOT / "run.py"), "-m", *overrides]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = proc.communicate(timeout=600)
        return proc.returncode, out
    return proc


def _slurm(env, *command):
    return subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=60).stdout


def _array_id(env, sweep_dir):
    """The SLURM array job id of the sweep's submission (its .submitit/ID_N folders)."""
    deadline = time.time() + 120
    while time.time() < deadline:
        folders = [p.name for p in (sweep_dir / ".submitit").glob("*_*") if p.is_dir()]
        if folders:
            return folders[0].split("_")[0]
        time.sleep(0.2)
    raise AssertionError(f"nothing submitted in {sweep_dir}")


def _checkpointed(job_dir, after_step=-1, timeout=240):
    """Wait for a mid-epoch checkpoint past ``after_step`` in a job folder; its step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            state = checkpoints.load(job_dir / "last.pt")
        except Exception:  # noqa: BLE001 - not written yet
            state = {}
        if state.get("position", 0) > 0 and state["step"] > after_step:
            return state["step"]
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint past step {after_step} in {job_dir}")


def _same_weights(job_dir, uninterrupted_dir):
    """The job's final weights equal those of test_faults' uninterrupted LONG run."""
    model = checkpoints.load(job_dir / "model.pth")["model"]
    weights = checkpoints.load(uninterrupted_dir / "model.pth")["model"]
    return all(torch.equal(model[k], weights[k]) for k in weights)


def test_a_submission_slurm_refuses_leaves_no_sweep_folder(slurm_env, tmp_path):
    """hydra/launcher=slurm_gpu on a cluster without GPUs: sbatch's error in one line, exit 2, nothing left."""
    sweep = tmp_path / "sweep"
    code, out = _sweep(slurm_env, "hydra/launcher=slurm_gpu", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}")
    assert code == 2, out
    assert "error: SLURM refused the sweep's jobs: sbatch: error: Invalid generic resource (gres) specification" in out
    assert "Traceback" not in out and not sweep.exists()
    assert "_" not in _slurm(slurm_env, "squeue", "-h", "-o", "%i %j")  # no job queued


def test_a_sweep_trains_evaluates_and_the_report_reads_it(slurm_env, tmp_path, weights_dir):
    """The CPU preset as it is: two jobs train and evaluate on the cluster, analysis.report reads the sweep."""
    sweep = tmp_path / "sweep"
    overrides = [*TINY, *TINY_EVAL, "task.evaluate=true", f"paths.weights_dir={weights_dir}", "loss.beta=1,4"]
    code, out = _sweep(slurm_env, "hydra/launcher=slurm", *overrides, f"hydra.sweep.dir={sweep}")
    assert code == 0, out
    assert "SIGUSR2 120 s before a job's time limit" in out
    jobs = _jobs(sweep)
    assert [read_summary(job)["status"] for job in jobs] == ["finished", "finished"]
    assert all(read_summary(job)["torch_threads"] == 2 for job in jobs)  # SLURM_CPUS_PER_TASK of the preset
    assert all(0 < read_summary(job)["test/mse"] < 1 for job in jobs)
    report = subprocess.run(
        [sys.executable, "-m", "analysis.report", str(sweep), "--out", str(tmp_path / "report")],
        cwd=ROOT,
        env=slurm_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "report" / "report.md").read_text()
    assert "- finished runs: 2" in text and "test/mse" in text


def test_preemption_and_requeue_resume_at_the_same_step(slurm_env, tmp_path, uninterrupted):  # noqa: F811
    """Job 0 gets the signal the launcher asked SLURM for (scancel --signal=), job 1 `scontrol requeue`: each
    checkpoints, is requeued, continues at the step it stopped at and ends with an uninterrupted run's weights."""
    sweep = tmp_path / "sweep"
    proc = _sweep(
        slurm_env,
        "hydra/launcher=slurm",
        "hydra.launcher.cpus_per_task=1",
        *LONG,
        "name=a,b",
        f"hydra.sweep.dir={sweep}",
        wait=False,
    )
    array = _array_id(slurm_env, sweep)
    signal_name = submitted_signal(sweep)
    assert signal_name == "USR2"
    stopped = {}
    for n, command in ((0, ["scancel", f"--signal={signal_name}"]), (1, ["scontrol", "requeue"])):
        stopped[n] = _checkpointed(sweep / str(n))
        _slurm(slurm_env, *command, f"{array}_{n}")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    for n in (0, 1):
        log = (sweep / str(n) / "run.log").read_text()
        (saved,) = re.findall(r"received: checkpoint saved at step (\d+)", log)
        assert int(saved) >= stopped[n]
        assert re.search(rf"resumed from \S+/last.pt at epoch \d+, batch \d+ \(step {saved}\)", log)
        assert read_summary(sweep / str(n))["status"] == "finished"
        assert _same_weights(sweep / str(n), uninterrupted)


def test_time_outs_and_a_cancelled_job_end_in_failures_json_and_the_rerun_finishes(slurm_env, tmp_path, uninterrupted):  # noqa: F811
    """timeout_min <= 10 makes every notice a time-out: with max_num_timeout=0 the first ends job 0 (submitit's
    UncompletedJobError), and job 1 is cancelled. The launcher returns, lists both in failures.json with the rerun
    command and no traceback; that command finishes both, job 0 with an uninterrupted run's weights."""
    sweep = tmp_path / "sweep"
    args = [
        "hydra/launcher=slurm",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=5",
        "hydra.launcher.max_num_timeout=0",
        *LONG,
        "name=a,b",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = _sweep(slurm_env, *args, wait=False)
    array = _array_id(slurm_env, sweep)
    _checkpointed(sweep / "0")
    _slurm(slurm_env, "scancel", f"--signal={submitted_signal(sweep)}", f"{array}_0")
    _checkpointed(sweep / "1")
    _slurm(slurm_env, "scancel", f"{array}_1")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    failures = json.loads((sweep / "failures.json").read_text())
    assert [f["job"] for f in failures] == ["0", "1"]
    assert "timed-out too many times" in failures[0]["error"] or "UncompletedJobError" in failures[0]["error"]
    assert "CANCELLED" in failures[1]["error"]
    rerun = out.split("to run them again in place (finished jobs are kept, stopped ones continue): ")[1].splitlines()[0]
    assert rerun.startswith("python run.py -m ") and f"hydra.sweep.dir={sweep}" in rerun
    code, again = _sweep(slurm_env, *args)  # the printed command's arguments
    assert code == 0, again
    assert [read_summary(job)["status"] for job in _jobs(sweep)] == ["finished", "finished"]
    assert not (sweep / "failures.json").exists()
    assert _same_weights(sweep / "0", uninterrupted)
