"""The training tasks end to end on smoke settings: the classifier and each variant through run.py's ``main`` in this
process with W&B offline (read back with ``wandb leet inspect``), overrides, seeds; and a multirun of run.py."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch

from semvae import checkpoints
from semvae.data import load_split
from semvae.tasks.train_vae import train_vae
from tests.conftest import (
    DATA_DIR,
    ROOT,
    compose_config,
    preflight,
    read_metrics,
    read_summary,
    run_in_process,
    run_py,
    wandb_inspect,
)


def test_classifier_task_trains_and_exports(tmp_path, weights_dir):
    path = weights_dir / "classifier.pth"
    model, state = checkpoints.load_classifier(path)
    assert state["kind"] == "classifier" and state["architecture"]["widths"] == [16, 32, 64]
    assert state["n_val"] == 2_000 and state["n_train"] >= 21_797
    assert state["summary"]["epochs"] == 2 and state["config"]["task"]["name"] == "train_classifier"
    # its test accuracy is what the exported model scores on the test batches smoke settings evaluate (2 x 32)
    test = load_split("mnist", DATA_DIR, train=False, download=False)
    with torch.no_grad():
        correct = (model(test.images[:64]).argmax(1) == test.labels[:64]).float().mean().item()
    assert state["test/accuracy"] == pytest.approx(correct, abs=1e-6)
    before = path.read_bytes()
    refused = preflight(
        "task=train_classifier",
        "trainer=smoke",
        "logger=none",
        f"paths.weights_dir={weights_dir}",
        f"hydra.run.dir={tmp_path}/again",
    )
    assert refused.returncode == 2 and f"error: classifier.checkpoint='{path}' exists" in refused.stderr
    assert "write elsewhere with classifier.checkpoint=" in refused.stderr and "task.overwrite=true" in refused.stderr
    assert path.read_bytes() == before  # the existing classifier is untouched
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize(
    ("variant", "beta", "weight", "job_type"),
    [("vae", 1.0, 0.0, "vae"), ("beta", 5.0, 0.0, "beta"), ("semantic", 1.0, 10.0, "semantic")],
)
def test_each_variant_trains_end_to_end_with_wandb_offline(
    tmp_path, weights_dir, wandb_offline, variant, beta, weight, job_type
):
    run_dir = tmp_path / "run"
    ended = run_in_process(f"variant={variant}", "trainer=smoke", f"paths.weights_dir={weights_dir}", run_dir=run_dir)
    assert ended.returncode == 0, ended.stderr

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

    logged = wandb_inspect(run_dir)
    assert (
        logged["state"] == "finished"
        and logged["name"] == {"vae": "VAE", "beta": "b5-VAE", "semantic": "semanticVAE"}[variant]
    )
    assert logged["config"]["loss"]["semantic_weight"] == weight
    assert logged["summary"]["val/loss"] == pytest.approx(summary["val/loss"], rel=1e-6)
    assert {f"train/{k}" for k in expected_terms} <= set(logged["summary"])
    image = logged["summary"]["images/reconstructions"]
    assert image["_type"] == "image-file" and (image["width"], image["height"]) == (242, 32)  # 4 pairs, a row of 8
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    with PIL.Image.open(wandb_run / "files" / image["path"]) as grid:  # the file the summary names is that grid
        assert grid.size == (242, 32)


def test_images_logged_to_wandb_are_the_grids_saved_beside_them(tmp_path, wandb_offline):
    from semvae.tracking import Tracker

    batch = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    tracker = Tracker(tmp_path, {}, mode="offline")
    tracker.log_images({"images/samples": batch}, step=1)
    tracker.finish()
    (logged,) = (tmp_path / "wandb").glob("offline-run-*/files/media/images/images/samples_*.png")
    with PIL.Image.open(tmp_path / "images_samples.png") as saved, PIL.Image.open(logged) as sent:
        assert np.array_equal(np.asarray(sent.convert("L")), np.asarray(saved.convert("L")))


@pytest.mark.parametrize(("n", "nrow"), [(2, 8), (4, 8), (8, 8), (13, 8), (7, 3)])
def test_image_grid_is_torchvisions_layout(n, nrow):
    from torchvision.utils import make_grid

    from semvae.tracking import image_grid

    batch = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(n))
    expected = make_grid(batch, nrow=nrow, padding=2, pad_value=1.0)
    assert torch.equal(image_grid(batch, nrow=nrow), expected[0]) and torch.equal(expected[0], expected[2])


@pytest.mark.parametrize(("n", "nrow"), [(0, 8), (3, 0)])
def test_image_grid_refuses_an_empty_batch_or_row(n, nrow):
    from semvae.tracking import image_grid

    with pytest.raises(ValueError, match=f"got {n} images and nrow={nrow}"):
        image_grid(torch.zeros(n, 1, 28, 28), nrow=nrow)


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


@pytest.mark.slow
def test_two_by_two_multirun_as_one_stack(tmp_path, weights_dir):
    """The four variants of a 2 x 2 grid train as one stack (hydra/launcher=stacked), each an ordinary run with its own
    folder, Hydra config, log and W&B run. The launcher's process never initialises CUDA (its forked processes could
    not use it): here every call that would raises (sitecustomize), and NVML answers for the device count."""
    sweep = tmp_path / "sweep"
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(
        "import torch\n"
        "def initialises(*_):\n"
        "    raise RuntimeError('CUDA initialised')\n"
        "torch.cuda._lazy_init = torch._C._cuda_getDeviceCount = initialises\n"
        "torch.cuda._device_count_nvml = lambda: 0\n"
    )
    proc = run_py(
        "-m",
        "hydra/launcher=stacked",
        "hydra.launcher.on_cpu=true",
        "runtime.device=auto",
        "loss.beta=1,5",
        "loss.semantic_weight=0,1",
        "loss.semantic.n_directions=1",  # a small model, and the semantic jobs' loss from 1 direction at 4 points
        "loss.semantic.n_points=4",
        "model.widths=[8,8,16]",
        "trainer=smoke",
        "trainer.epochs=1",
        f"paths.weights_dir={weights_dir}",
        f"hydra.sweep.dir={sweep}",
        env={"PYTHONPATH": os.pathsep.join([str(guard), str(ROOT)])},
    )
    assert "1 stack: 4 members (jobs 0 1 2 3) on cpu; 0 jobs alone" in proc.stdout
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 4
    seen, run_ids = {}, set()
    for job in jobs:
        summary = read_summary(job)
        config = checkpoints.load(job / "model.pth")["config"]["loss"]
        seen[(config["beta"], config["semantic_weight"])] = summary["variant"]
        (wandb_run,) = (job / "wandb").glob("offline-run-*")  # each job logged into a W&B run of its own
        assert f"in {job}" in (job / "run.log").read_text().splitlines()[0]  # and into a log of its own
        assert (job / ".hydra" / "overrides.yaml").is_file() and summary["status"] == "finished"
        run_ids.add(wandb_run.name.rsplit("-", 1)[1])
    assert seen == {(1.0, 0.0): "vae", (5.0, 0.0): "beta", (1.0, 1.0): "semantic", (5.0, 1.0): "beta-semantic"}
    assert len(run_ids) == 4
    logged = wandb_inspect(jobs[-1])  # read back: the last job's run holds its own config
    assert logged["state"] == "finished" and logged["run_id"] in run_ids
    assert logged["config"]["loss"] == checkpoints.load(jobs[-1] / "model.pth")["config"]["loss"]
