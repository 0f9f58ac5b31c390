"""Sweeps through Hydra's launcher and sweeper plugins, each a run.py process: the local launcher (a process per job),
submitit's local executor, Optuna."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest
import yaml
from hydra import compose, initialize_config_dir

from semvae import rundir
from semvae.config import register_configs
from tests.conftest import DATA_DIR, ROOT, read_summary, run_py

TINY = ["trainer=smoke", "trainer.epochs=1", "model.widths=[8,8,16]", "logger=none"]
# a semantic job's loss from 1 direction at 4 starting points instead of 4 at 32: what a sweep does with it is the same
CHEAP_SEMANTIC = ["loss.semantic.n_directions=1", "loss.semantic.n_points=4"]
TINY_EVAL = [
    "evaluation.steps=[1.0]",
    "evaluation.limit_test=100",
    "evaluation.n_points=10",
    "evaluation.morpho_points=4",
    "evaluation.n_random_directions=1",
    "evaluation.n_pairs=2",
    "evaluation.judges=[train]",  # the judge of the objectives below
]


def _jobs(sweep):
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def _span(job, skip=0):
    """When a job's run.log says it started and ended, reading from character ``skip`` on (an attempt's lines)."""
    lines = (job / "run.log").read_text()[skip:].splitlines()
    stamps = [line[1:24] for line in lines if line.startswith("[20")]
    return datetime.fromisoformat(stamps[0].replace(",", ".")), datetime.fromisoformat(stamps[-1].replace(",", "."))


@pytest.mark.slow
def test_a_killed_job_fails_alone_and_a_rerun_clears_the_errors_that_no_longer_hold(tmp_path, weights_dir):
    """The local launcher: a job killed with SIGKILL and one that fails fail alone; the same command then runs both
    at the same time, each job with its share of the cores, and clears the errors."""
    sweep, weights = tmp_path / "sweep", tmp_path / "weights"
    weights.mkdir()  # no classifier yet: the semantic job fails
    args = [
        "-m",
        "hydra/launcher=local",
        *TINY,
        "trainer.limit_train_batches=20",
        "loss.semantic_weight=0,1",
        *CHEAP_SEMANTIC,
        f"paths.weights_dir={weights}",
        f"hydra.sweep.dir={sweep}",
    ]
    env = os.environ | {"SEMVAE_DATA_DIR": str(DATA_DIR)}
    command = [sys.executable, str(ROOT / "run.py"), *args]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (sweep / "0" / "last.pt").exists() and (sweep / "0" / ".lock").exists():
            break
        time.sleep(0.05)
    job_pid = json.loads((sweep / "0" / ".lock").read_text())["pid"]
    assert job_pid != proc.pid
    os.kill(job_pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "2 of 2 jobs failed" in output
    assert (
        f"to run them again in place (finished jobs are kept, stopped ones continue): python run.py -m {TINY[0]}"
        in output
    )
    assert f"hydra.sweep.dir={sweep}" in output
    assert "the job's process was killed by SIGKILL" in (sweep / "0" / "error.txt").read_text()
    assert "classifier.checkpoint" in (sweep / "1" / "error.txt").read_text()
    assert len(json.loads((sweep / "failures.json").read_text())) == 2

    shutil.copy(weights_dir / "classifier.pth", weights / "classifier.pth")
    logged = [len((job / "run.log").read_text()) for job in _jobs(sweep)]
    run_py(*args)  # the same sweep again: job 0 resumes, job 1 now finds its classifier
    jobs = _jobs(sweep)
    assert [read_summary(job)["status"] for job in jobs] == ["finished", "finished"]
    assert not list(sweep.glob("*/error.txt")) and not (sweep / "failures.json").exists()
    assert [read_summary(job)["torch_threads"] for job in jobs] == [max(1, os.cpu_count() // 2)] * 2  # shared cores
    (start0, end0), (start1, end1) = (_span(job, skip) for job, skip in zip(jobs, logged, strict=True))
    assert start1 < end0 and start0 < end1  # the two jobs of the rerun overlapped


@pytest.mark.slow
def test_a_sweep_folder_in_use_is_refused_before_anything_is_written(tmp_path):
    held = rundir.hold(tmp_path / "sweep")  # as a running sweep holds it
    try:
        proc = run_py("-m", "hydra/launcher=local", *TINY, "seed=0,1", f"hydra.sweep.dir={held}", check=False)
    finally:
        rundir.release(held)
    assert proc.returncode == 2 and f"error: {held} is in use by another run (pid {os.getpid()}" in proc.stderr
    assert sorted(p.name for p in held.iterdir()) == [".lock"]


@pytest.mark.slow
def test_submitit_local_executor_runs_a_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    run_py("-m", "hydra/launcher=submitit_local", *TINY, "seed=0", f"hydra.sweep.dir={sweep}")  # a job in a new process
    assert [read_summary(job)["status"] for job in _jobs(sweep)] == ["finished"]
    assert (sweep / ".submitit").is_dir()


@pytest.mark.slow
def test_optuna_multi_objective_search_returns_the_pareto_set(tmp_path, weights_dir):
    sweep = tmp_path / "sweep"
    run_py(
        "-m",
        "experiment=pareto_optuna",
        *TINY,
        *CHEAP_SEMANTIC,
        *TINY_EVAL,
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=1",
        "objectives=[test/mse,test/gsv_norm_train]",
        f"paths.weights_dir={weights_dir}",
        f"hydra.sweep.dir={sweep}",
    )
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert 1 <= len(results["solutions"]) <= 2
    jobs = {job.name: read_summary(job) for job in _jobs(sweep)}
    assert len(jobs) == 2
    evaluated = [(s["test/mse"], s["test/gsv_norm_train"]) for s in jobs.values()]
    for solution in results["solutions"]:
        assert set(solution["params"]) == {"loss.beta", "loss.semantic_weight"}
        assert tuple(solution["values"]) in evaluated  # what the jobs measured, returned through run.py
        assert 0.5 <= solution["params"]["loss.beta"] <= 8.0


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        (["loss.beta=2.5", "loss.semantic_weight=3.2"], "pareto_b2.5-semanticVAE-l3.2"),
        (["loss.beta=1", "loss.semantic_weight=3.2", "loss.semantic.normalize=false"], "pareto_semanticVAE-l3.2-raw"),
    ],
)
def test_optuna_trials_are_named_after_their_whole_loss_setting(overrides, name):
    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=pareto_optuna", *overrides])
    assert cfg.name == name


def test_the_beta_semantic_study_is_a_45_job_grid_that_evaluates():
    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=sweep_beta_semantic"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    sizes = [len(str(params[key]).split(",")) for key in ("loss.beta", "loss.semantic_weight", "seed")]
    assert sizes == [3, 5, 3] and str(params["loss.semantic_weight"]).split(",") == ["0", "1", "10", "100", "1000"]
    assert cfg.task.evaluate is True and cfg.logger.group == "sweep_beta_semantic"
