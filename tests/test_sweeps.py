"""Sweeps through Hydra's launcher and sweeper plugins: joblib in parallel, submitit's local executor, Optuna."""

import os

import yaml
from hydra import compose, initialize_config_dir

from semvae.config import register_configs
from tests.conftest import ROOT, read_summary, run_py

TINY = ["trainer=smoke", "trainer.epochs=1", "logger=none"]
TINY_EVAL = [
    "evaluation.limit_test=100",
    "evaluation.n_points=10",
    "evaluation.morpho_points=4",
    "evaluation.n_random_directions=1",
    "evaluation.n_pairs=2",
    "evaluation.judges=[train]",
]


def _jobs(sweep):
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def test_joblib_runs_jobs_in_parallel_without_oversubscribing(tmp_path):
    sweep = tmp_path / "sweep"
    run_py("-m", "hydra/launcher=local", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}")
    jobs = _jobs(sweep)
    assert len(jobs) == 2
    for job in jobs:
        summary = read_summary(job)
        assert summary["status"] == "finished"
        assert summary["torch_threads"] == max(1, os.cpu_count() // 2)  # the cores shared between 2 jobs


def test_joblib_sweep_reports_a_failing_job_and_finishes_the_rest(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_py(
        "-m", "hydra/launcher=local", *TINY, "loss.semantic_weight=0,-1", f"hydra.sweep.dir={sweep}", check=False
    )
    assert proc.returncode == 1 and "1 of 2 jobs failed" in proc.stdout + proc.stderr
    assert read_summary(sweep / "0")["status"] == "finished"
    assert "loss.semantic_weight=-1.0: must be >= 0" in (sweep / "1" / "error.txt").read_text()


def test_submitit_local_executor_runs_a_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    run_py("-m", "hydra/launcher=submitit_local", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}")
    assert [read_summary(job)["status"] for job in _jobs(sweep)] == ["finished", "finished"]
    assert (sweep / ".submitit").is_dir()


def test_optuna_multi_objective_search_returns_the_pareto_set(tmp_path, weights_dir):
    sweep = tmp_path / "sweep"
    run_py(
        "-m",
        "experiment=pareto_optuna",
        *TINY,
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


def test_the_beta_semantic_study_is_a_36_job_grid_that_evaluates():
    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=sweep_beta_semantic"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    sizes = [len(str(params[key]).split(",")) for key in ("loss.beta", "loss.semantic_weight", "seed")]
    assert sizes == [3, 4, 3] and "0" in str(params["loss.semantic_weight"]).split(",")
    assert cfg.task.evaluate is True and cfg.logger.group == "sweep_beta_semantic"
