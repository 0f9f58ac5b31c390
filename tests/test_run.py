"""The real entry point, end to end, on smoke settings: each variant, the classifier, a sweep, W&B offline files."""

import json
import subprocess
import sys

import pytest
import torch

from semvae import checkpoints
from semvae.tasks.train_vae import train_vae
from tests.conftest import compose_config, read_metrics, read_summary, run_py


def wandb_summary(run_dir):
    """Read an offline W&B run back the way a user would: `wandb leet inspect --summary --json`."""
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    assert list(wandb_run.glob("run-*.wandb")), "no W&B transaction log"
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(wandb_run)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout)


def test_classifier_task_trains_and_exports(tmp_path, weights_dir):
    path = weights_dir / "classifier.pth"
    state = checkpoints.load(path)
    assert state["kind"] == "classifier" and state["architecture"]["widths"] == [16, 32, 64]
    assert 0.0 <= state["test/accuracy"] <= 1.0 and state["n_val"] == 2_000 and state["n_train"] >= 21_797
    assert state["summary"]["epochs"] == 2 and state["config"]["task"]["name"] == "train_classifier"
    before = path.read_bytes()
    proc = run_py(
        "task=train_classifier",
        "trainer=smoke",
        "logger=none",
        f"paths.weights_dir={weights_dir}",
        f"hydra.run.dir={tmp_path}/again",
        check=False,
    )
    assert proc.returncode == 2 and "exists; pass task.overwrite=true" in proc.stderr
    assert path.read_bytes() == before  # the existing classifier is untouched


@pytest.mark.parametrize(
    ("variant", "beta", "weight", "job_type"),
    [("vae", 1.0, 0.0, "vae"), ("beta", 5.0, 0.0, "beta"), ("semantic", 1.0, 10.0, "semantic")],
)
def test_each_variant_trains_end_to_end_with_wandb_offline(tmp_path, weights_dir, variant, beta, weight, job_type):
    run_dir = tmp_path / "run"
    run_py(f"variant={variant}", "trainer=smoke", f"paths.weights_dir={weights_dir}", f"hydra.run.dir={run_dir}")

    summary = read_summary(run_dir)
    assert summary["variant"] == job_type and summary["epochs"] == 2 and summary["steps"] == 6
    expected_terms = {"recon", "kl", "loss"} | ({"semantic"} if weight > 0 else set())
    assert {f"val/{k}" for k in expected_terms | {"neg_elbo", "mse"}} <= set(summary)
    assert summary["val/loss"] == pytest.approx(
        summary["val/recon"] + beta * summary["val/kl"] + weight * summary.get("val/semantic", 0.0), rel=1e-5
    )

    records = read_metrics(run_dir)
    steps = [r for r in records if "train/loss" in r and "val/loss" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all({f"train/{k}" for k in expected_terms} <= set(r) for r in steps)
    assert [r["epoch"] for r in records if "val/loss" in r] == [1, 2]

    for name in ("last.pt", "best.pt", "model.pth", "images_reconstructions.png", "images_prior_samples.png"):
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["loss"]["beta"] == beta and config["variant"] == job_type
    last = checkpoints.load(run_dir / "last.pt")
    assert last["epoch"] == 2 and last["config"]["loss"]["beta"] == beta and "rng" in last

    logged = wandb_summary(run_dir)
    assert (
        logged["state"] == "finished"
        and logged["name"] == {"vae": "VAE", "beta": "b5-VAE", "semantic": "semanticVAE"}[variant]
    )
    assert logged["config"]["loss"]["semantic_weight"] == weight
    assert logged["summary"]["val/loss"] == pytest.approx(summary["val/loss"], rel=1e-6)
    assert {f"train/{k}" for k in expected_terms} <= set(logged["summary"])
    assert logged["summary"]["images/reconstructions"]["_type"] == "image-file"
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    assert (wandb_run / "files" / "media" / "images").is_dir()
    assert any((wandb_run).rglob("*.wandb"))


def test_overrides_reach_the_model_and_the_data(tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["model.latent_dim=3", "model.widths=[8,8,16]", "seed=3", "trainer=smoke", "trainer.epochs=1"]
    train_vae(compose_config(*overrides, "logger=none"), run_dir)
    state = checkpoints.load(run_dir / "model.pth")
    assert state["architecture"] == {"latent_dim": 3, "widths": [8, 8, 16], "blocks": 1}
    assert state["model"]["from_latent.weight"].shape == (16 * 7 * 7, 3)
    assert state["config"]["seed"] == 3 and not (run_dir / "wandb").exists()


def test_same_seed_same_run(tmp_path):
    for name in ("a", "b"):
        train_vae(compose_config("trainer=smoke", "logger=none"), tmp_path / name)
    a, b = (checkpoints.load(tmp_path / n / "model.pth")["model"] for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_by_two_multirun(tmp_path, weights_dir):
    sweep = tmp_path / "sweep"
    run_py(
        "-m",
        "loss.beta=1,5",
        "loss.semantic_weight=0,1",
        "trainer=smoke",
        "trainer.epochs=1",
        f"paths.weights_dir={weights_dir}",
        f"hydra.sweep.dir={sweep}",
    )
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 4
    seen = {}
    for job in jobs:
        summary = read_summary(job)
        config = checkpoints.load(job / "model.pth")["config"]["loss"]
        seen[(config["beta"], config["semantic_weight"])] = summary["variant"]
        logged = wandb_summary(job)
        assert logged["config"]["loss"]["beta"] == config["beta"]  # each job logged into its own W&B run
        assert logged["state"] == "finished"
    assert seen == {(1.0, 0.0): "vae", (5.0, 0.0): "beta", (1.0, 1.0): "semantic", (5.0, 1.0): "beta-semantic"}
    assert len({wandb_summary(job)["run_id"] for job in jobs}) == 4
