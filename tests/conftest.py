"""Shared test helpers: where MNIST is, and running the real entry point ``run.py`` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SEMVAE_ROOT", str(ROOT))  # as run.py sets it, for configs composed in-process


def find_data_dir() -> Path:
    """SEMVAE_DATA_DIR, else the repo's data/, else the pre-staged ../shared/data beside the checkout."""
    candidates = [os.environ.get("SEMVAE_DATA_DIR"), ROOT / "data", ROOT.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "MNIST" / "raw").is_dir():
            return Path(candidate).resolve()
    raise RuntimeError("MNIST not found: set SEMVAE_DATA_DIR to a folder holding MNIST/raw/ (see README, 'Data')")


DATA_DIR = find_data_dir()
os.environ.setdefault("SEMVAE_DATA_DIR", str(DATA_DIR))  # for configs composed in-process


def compose_config(*overrides: str):
    """The typed, validated config that ``python run.py OVERRIDES`` runs with, composed in-process with Hydra's
    compose API (for tests that call a task function directly instead of starting run.py)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from semvae import rundir
    from semvae.config import register_configs, validate

    register_configs()
    rundir.register_resolver()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return validate(OmegaConf.to_object(compose("config", overrides=list(overrides))))


def train_loop(run_dir: Path, model, train, val, step_fn, eval_fn, *, resume=None, stop=None, tracker=None, **settings):
    """Train with the Trainer and the standard callbacks in ``run_dir`` (no W&B), as a task does; ``settings`` are
    TrainerConfig fields (progress off unless given). Returns the FitResult."""
    from semvae.config import TrainerConfig
    from semvae.tracking import Tracker
    from semvae.training import Trainer, standard_callbacks

    settings = {"progress": False} | settings
    seed = settings.pop("seed", 0)
    trainer_settings = TrainerConfig(**settings)
    tracker = tracker or Tracker(run_dir, {}, mode="disabled")
    callbacks = standard_callbacks(run_dir, tracker, trainer_settings.checkpoint_every, trainer_settings.progress)
    trainer = Trainer(model, train, val, step_fn, eval_fn, trainer_settings, seed=seed, callbacks=callbacks, stop=stop)
    return trainer.fit(resume)


def run_py(*overrides: str, cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    """``python run.py OVERRIDES`` with the test data and no W&B network, as a user would type it."""
    env = os.environ | {
        "SEMVAE_DATA_DIR": str(DATA_DIR),
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_MODE": "offline",
        "HYDRA_FULL_ERROR": "0",
    }
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py {' '.join(overrides)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    """A weights folder holding a smoke-trained classifier (seconds), for the semantic variant's tests."""
    weights = tmp_path_factory.mktemp("weights")
    run_dir = tmp_path_factory.mktemp("classifier_run")
    run_py(
        "task=train_classifier",
        "trainer=smoke",
        "logger=none",
        f"paths.weights_dir={weights}",
        f"hydra.run.dir={run_dir}",
    )
    return weights
