"""Shared test helpers. The suite has three tiers, named by what they cost:

1. unit tests of functions on tiny tensors or fixture files (most of test_losses, test_models, test_morpho, ...);
2. in-process tests: the config composed with Hydra's compose API (``compose_config``, the one compose helper),
   the task function called directly (``train_vae``, ``evaluate_models``, ...), or run.py's own functions around it
   (``run_in_process``: its ``main`` without Hydra's process; ``preflight``: its guard before the run's folder exists);
3. ``slow`` tests: those that start a process (``run_py``: signals, launchers and multiruns, a refusal before Hydra
   writes anything) or take more than about ten seconds alone (a training with its evaluation, a stack).
   ``python -m pytest -m "not slow"`` runs tiers 1 and 2 only.

Tests that need MNIST find it through ``need_mnist()`` or the ``mnist_dir`` fixture, and are skipped, saying why,
where it is missing; the rest of the suite still collects and runs.

Every test starts with Hydra uninitialised and leaves torch's global settings as it found them (``_global_state``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SEMVAE_ROOT", str(ROOT))  # as run.py sets it, for configs composed in-process


NO_MNIST = "MNIST not found: set SEMVAE_DATA_DIR to a folder holding MNIST/raw/ (README, 'Data')"


def find_data_dir() -> Path | None:
    """SEMVAE_DATA_DIR, else the repo's data/, else the pre-staged ../shared/data beside the checkout; None where
    none holds MNIST (the tests that need it are then skipped, saying so, and the others run)."""
    candidates = [os.environ.get("SEMVAE_DATA_DIR"), ROOT / "data", ROOT.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "MNIST" / "raw").is_dir():
            return Path(candidate).resolve()
    return None


DATA_DIR = find_data_dir()


def need_mnist() -> Path:
    """The MNIST folder, or skip the calling test with the reason."""
    if DATA_DIR is None:
        pytest.skip(NO_MNIST)
    return DATA_DIR


@pytest.fixture
def mnist_dir() -> Path:
    """The folder holding MNIST/raw/ (the test is skipped where there is none)."""
    return need_mnist()


def _share_cores_between_workers() -> None:
    """Under pytest-xdist (``-n``) each worker, and the processes its tests start, get the worker's share of the
    cores for torch, so that two workers on two cores run two threads, not four. An OMP_NUM_THREADS set by the user
    rules instead."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if workers.isdigit() and "OMP_NUM_THREADS" not in os.environ:
        share = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)


_share_cores_between_workers()
if DATA_DIR is not None:
    os.environ.setdefault("SEMVAE_DATA_DIR", str(DATA_DIR))  # for configs composed in-process


def _register() -> None:
    from semvae import rundir
    from semvae.config import register_configs

    register_configs()
    rundir.register_resolver()


def compose_raw(*overrides: str, hydra: bool = False):
    """The DictConfig that ``python run.py OVERRIDES`` composes, with Hydra's compose API, not yet validated (with
    its ``hydra`` node where asked: run and sweep dirs, the launcher). For tests of composition itself."""
    from hydra import compose, initialize_config_dir

    _register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3", job_name="run"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def compose_config(*overrides: str):
    """The typed, validated config that ``python run.py OVERRIDES`` runs with, composed in-process with Hydra's
    compose API (for tests that call a task function directly instead of starting run.py). ``hydra.*`` and
    ``hydra/...`` overrides are composed too (a launcher, a sweep dir) and then left out, as Hydra leaves them out of
    the task's config. With ``compose_raw``, the one way tests compose a config."""
    from omegaconf import OmegaConf, open_dict

    from semvae.config import validate

    cfg = compose_raw(*overrides, hydra=True)
    with open_dict(cfg):
        del cfg["hydra"]
    return validate(OmegaConf.to_object(cfg))


@contextlib.contextmanager
def hydra_app(*overrides: str, run_dir: str | Path | None = None):
    """run.py's Hydra app in this process: the config of ``python run.py OVERRIDES``, ``HydraConfig`` set as Hydra
    sets it for a run (mode RUN, ``run_dir`` or ``hydra.run.dir`` as the output dir) and Hydra initialised for the
    block (task=reproduce composes its stages' configs). Yields the config without its ``hydra`` node, as Hydra
    passes it to ``main``, and the run dir."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    _register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3", job_name="run"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        output_dir = Path(run_dir if run_dir is not None else cfg.hydra.run.dir)
        with open_dict(cfg):
            cfg.hydra.mode = RunMode.RUN
            cfg.hydra.runtime.output_dir = str(output_dir)
        HydraConfig.instance().set_config(cfg)
        task_cfg = cfg.copy()
        with open_dict(task_cfg):
            del task_cfg["hydra"]
        try:
            yield task_cfg, output_dir
        finally:
            HydraConfig.instance().cfg = None


@dataclass
class Ended:
    """How run.py's code ended, in-process: its exit status (0 when it returned) and what it printed to stderr."""

    returncode: int
    stderr: str
    result: object = None


def _ended(call) -> Ended:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            result = call()
        except SystemExit as exit_:
            return Ended(exit_.code, err.getvalue())
    return Ended(0, err.getvalue(), result)


def run_in_process(*overrides: str, run_dir: str | Path | None = None) -> Ended:
    """``python run.py OVERRIDES`` once Hydra has started, in this process: run.py's ``main`` (the run dir's lock,
    the stop flag, the checks, the task, and the mapping of errors to an exit status and a one-line message)."""
    import run

    need_mnist()
    with hydra_app(*overrides, run_dir=run_dir) as (cfg, _):
        return _ended(lambda: run.main.__wrapped__(cfg))


def preflight(*overrides: str) -> Ended:
    """What ``python run.py OVERRIDES`` does before Hydra creates a run's folder, in this process: run.py's key
    check, Hydra's composition and ``semvae.guard.RunGuard.on_run_start``, with run.py's mapping of a refusal to one
    line and an exit status. A run they let through is admitted with its folder locked; both are released here,
    and ``result`` is the run dir."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    import run
    from semvae import guard

    args = list(overrides)

    def start() -> str:
        run.check_override_keys(args)
        _register()
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3", job_name="run"):
            cfg = compose("config", overrides=args, return_hydra_config=True)
            with open_dict(cfg):
                cfg.hydra.mode = "RUN"
            guard.RunGuard().on_run_start(config=cfg)
            return str(cfg.hydra.run.dir)

    ended = _ended(lambda: run.reported(start))
    if ended.result is not None:
        guard.dismiss(ended.result)
    return ended


@contextlib.contextmanager
def torch_settings():
    """torch's threads, TF32 flags and default dtype restored after the block (a task sets them through
    semvae.runtime)."""
    saved = (
        torch.get_num_threads(),
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
        torch.get_default_dtype(),
    )
    try:
        yield
    finally:
        threads, cudnn_tf32, matmul_tf32, dtype = saved
        torch.set_num_threads(threads)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.set_default_dtype(dtype)


@pytest.fixture(autouse=True)
def _global_state():
    """Each test starts with Hydra uninitialised and leaves it so, and leaves torch's global settings as it found
    them."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with torch_settings():
        yield
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None


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


def run_py(
    *overrides: str, cwd: Path = ROOT, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``python run.py OVERRIDES`` in a process of its own, with the test data and no W&B network, as a user would
    type it (tier 3: for tests whose point is the process); ``env`` adds environment variables."""
    env = (
        os.environ
        | {
            "SEMVAE_DATA_DIR": str(DATA_DIR),
            "WANDB_ERROR_REPORTING": "false",
            "WANDB_MODE": "offline",
            "HYDRA_FULL_ERROR": "0",
        }
        | (env or {})
    )
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


@pytest.fixture
def wandb_offline(monkeypatch):
    """W&B in this process as run_py sets it up: offline, no API key, no error reports."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def wandb_inspect(run_dir: Path) -> dict:
    """Read an offline W&B run back the way a user would: ``wandb leet inspect --summary --json`` on the run dir's
    one offline run."""
    (wandb_run,) = (Path(run_dir) / "wandb").glob("offline-run-*")
    assert list(wandb_run.glob("run-*.wandb")), "no W&B transaction log"
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(wandb_run)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout)


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    """A weights folder holding a smoke-trained classifier (seconds, in this process), for the semantic variant's
    tests."""
    from semvae.tasks.train_classifier import train_classifier

    need_mnist()
    weights = tmp_path_factory.mktemp("weights")
    run_dir = tmp_path_factory.mktemp("classifier_run")
    with torch_settings():
        train_classifier(
            compose_config("task=train_classifier", "trainer=smoke", "logger=none", f"paths.weights_dir={weights}"),
            run_dir,
        )
    return weights


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slurm`` need a SLURM cluster (tests/slurm/cluster.sh) and minutes of it: they run only when
    ``-m`` names them (``python -m pytest -m slurm``, .ci/run's own tier); the README's test command leaves them
    out."""
    if "slurm" in (config.getoption("-m") or ""):
        return
    kept = [item for item in items if item.get_closest_marker("slurm") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept
