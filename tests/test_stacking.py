"""Stacked training (semvae/training/stacking.py): members trained together end where they would alone."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch

from hydra_plugins.semvae_launcher.stacked import device_of, stack_key
from semvae import checkpoints
from semvae.models import ResNetVAE
from semvae.stopping import StopFlag, StopRequested
from semvae.tasks.train_vae import train_vae
from semvae.training import Trainer, stacking
from semvae.training.stacking import run_stacked
from tests.conftest import ROOT, compose_config, read_metrics, read_summary

# A stacked member differs from the same run trained alone by float rounding only: the vectorised convolutions sum
# in another order, and Adam's step is computed on the stacked tensors. Adam turns rounding in near-zero gradient
# entries into whole steps, and the normalised semantic term (a ratio) amplifies it further, so the tolerance is
# stated against how far training moved the weights: |w_stacked - w_alone| / |w_alone - w_init| (L2 over all
# weights). Measured after 12 steps (Intel Xeon, fp32, `pytest tests/test_stacking.py`): 3e-7 to 9e-7 for lambda = 0
# and 0.03% with the semantic term, against 0.6-2.1% between the same lone run with and without
# runtime.channels_last (the same maths in other kernels).
TOLERANCE = {False: 1e-4, True: 5e-2}  # by whether the member trains with the semantic term
LOSS_RTOL = {False: 1e-4, True: 2e-2}

MEMBERS = {  # name: overrides
    "vae": ["loss.beta=1", "loss.semantic_weight=0", "seed=0"],
    "beta": ["loss.beta=5", "loss.semantic_weight=0", "seed=1"],
    "semantic": ["loss.beta=2", "loss.semantic_weight=10", "loss.semantic.directions=axis", "seed=2"],
}
SHORT = [
    "trainer=smoke",
    "trainer.epochs=2",
    "trainer.limit_train_batches=6",
    "trainer.batch_size=16",
    "trainer.checkpoint_every=4",
    "model.widths=[8,8,8]",
    "loss.semantic.n_points=8",
]


# the same tests on a GPU (python -m pytest -m cuda), with cuDNN's deterministic kernels for the bit-for-bit resume
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]
    ),
]


@pytest.fixture(scope="module", params=DEVICES)
def device(request):
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = request.param == "cuda" or deterministic
    yield request.param
    torch.backends.cudnn.deterministic = deterministic


def member_config(weights_dir, overrides, *extra, device="cpu"):
    return compose_config(
        *SHORT, "logger=none", f"runtime.device={device}", f"paths.weights_dir={weights_dir}", *overrides, *extra
    )


@pytest.fixture(scope="module")
def alone(tmp_path_factory, weights_dir, device):
    """Each member trained alone, in its own folder."""
    root = tmp_path_factory.mktemp("alone")
    for name, overrides in MEMBERS.items():
        train_vae(member_config(weights_dir, overrides, device=device), root / name)
    return root


def initial_weights(run_dir) -> dict:
    """The weights a run started from: its seed's initialisation."""
    config = checkpoints.load(run_dir / "model.pth")["config"]
    torch.manual_seed(config["seed"])
    m = config["model"]
    return ResNetVAE(m["latent_dim"], m["widths"], m["blocks"]).state_dict()


def assert_same_run(stacked_dir, alone_dir):
    a, b = (checkpoints.load(d / "model.pth")["model"] for d in (stacked_dir, alone_dir))
    start = initial_weights(alone_dir)
    assert a.keys() == b.keys()
    semantic = "val/semantic" in read_summary(alone_dir)
    deviation = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    moved = torch.cat([(b[k] - start[k]).flatten() for k in a]).norm()
    assert moved > 0.1
    assert deviation / moved <= TOLERANCE[semantic], f"{stacked_dir.name}: {deviation / moved:.3g} of the movement"
    ms, mt = read_metrics(stacked_dir), read_metrics(alone_dir)
    assert [m["step"] for m in ms] == [m["step"] for m in mt] and len(ms) > 12
    for x, y in zip(ms, mt, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=LOSS_RTOL[semantic], abs=1e-6), key


def stack_jobs(weights_dir, root, device):
    configs = {name: member_config(weights_dir, overrides, device=device) for name, overrides in MEMBERS.items()}
    return [lambda c=c, d=root / name: train_vae(c, d) for name, c in configs.items()]


@pytest.fixture(scope="module")
def stacked(tmp_path_factory, weights_dir, device):
    """The members trained together, uninterrupted."""
    root = tmp_path_factory.mktemp("stacked")
    results = run_stacked(stack_jobs(weights_dir, root, device))
    assert [error for _, error in results] == [None] * len(MEMBERS)
    return root


def test_members_of_a_stack_end_where_they_would_alone(stacked, alone):
    for name in MEMBERS:
        assert_same_run(stacked / name, alone / name)
        # a member's files are a lone run's: last.pt holds the same entries, of the same size
        a, b = (checkpoints.load(root / name / "last.pt") for root in (stacked, alone))
        assert a.keys() == b.keys() and a["rng"]["generators"].keys() == b["rng"]["generators"].keys()
        assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
        assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"] == 12
        sizes = [(root / name / "last.pt").stat().st_size for root in (stacked, alone)]
        assert abs(sizes[0] - sizes[1]) < 0.05 * sizes[1], sizes
        assert sorted(p.name for p in (stacked / name).iterdir()) == sorted(p.name for p in (alone / name).iterdir())
    # the semantic members trained with their term, the others without it
    assert "train/semantic" in read_metrics(stacked / "semantic")[0]
    assert "train/semantic" not in read_metrics(stacked / "beta")[0]


def crash_at_step(monkeypatch, step: int, alone: bool = False) -> None:
    """Make the stack's optimiser step (a lone Trainer's with ``alone``) fail while computing step ``step``, as a
    kill -9 would end the run there: what it saved before (last.pt) stays."""
    if alone:
        original_step = Trainer.optimizer_step

        def failing_alone(self, index):
            if self.step == step - 1:
                raise RuntimeError("killed")
            return original_step(self, index)

        monkeypatch.setattr(Trainer, "optimizer_step", failing_alone)
        return
    original = stacking._Stack.step

    def failing(self, indices):
        if any(m.trainer.step == step - 1 for m in self.members):
            raise RuntimeError("killed")
        return original(self, indices)

    monkeypatch.setattr(stacking._Stack, "step", failing)


def signal_during_step(monkeypatch, step: int) -> None:
    """A SIGTERM arriving while the stack computes optimiser step ``step``."""
    original = stacking._Stack.step

    def signalled(self, indices):
        if any(m.trainer.step == step - 1 for m in self.members):
            StopFlag._active.signum = signal.SIGTERM
        return original(self, indices)

    monkeypatch.setattr(stacking._Stack, "step", signalled)


def test_a_crashed_then_stopped_stack_resumes_every_member_exactly(
    tmp_path, weights_dir, device, stacked, alone, monkeypatch
):
    """A crash in step 6 (as kill -9 leaves a run: last.pt of step 4) and, on the rerun, a stop signal during step
    9; the third run ends every member bit for bit where the uninterrupted stack ended. A member's last.pt is a
    lone run's: one of them, resumed alone, ends where the lone run ends (up to the stack's rounding)."""
    with monkeypatch.context() as patch:
        crash_at_step(patch, 6)
        assert all("killed" in str(error) for _, error in run_stacked(stack_jobs(weights_dir, tmp_path, device)))
    assert {checkpoints.load(tmp_path / n / "last.pt")["step"] for n in MEMBERS} == {4}
    shutil.copytree(tmp_path / "semantic", tmp_path / "semantic_alone")

    with monkeypatch.context() as patch, StopFlag():
        signal_during_step(patch, 9)
        outcomes = run_stacked(stack_jobs(weights_dir, tmp_path, device))
    assert all(isinstance(error, StopRequested) for _, error in outcomes)
    # the signal is read at the start of every step of the stack: every member stops after the next one
    assert {read_summary(tmp_path / n)["stopped_at_step"] for n in MEMBERS} == {10}

    assert [error for _, error in run_stacked(stack_jobs(weights_dir, tmp_path, device))] == [None] * len(MEMBERS)
    for name in MEMBERS:
        a, b = (checkpoints.load(root / name / "model.pth")["model"] for root in (tmp_path, stacked))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert read_metrics(tmp_path / name) == read_metrics(stacked / name)

    train_vae(member_config(weights_dir, MEMBERS["semantic"], device=device), tmp_path / "semantic_alone")
    assert_same_run(tmp_path / "semantic_alone", alone / "semantic")


def test_a_lone_checkpoint_joins_a_stack_beside_a_failing_member(tmp_path, weights_dir, device, alone, monkeypatch):
    """A lone run's last.pt (step 4) continues in a stack beside a fresh member and one whose loss turns
    non-finite: that one fails with its own error, the others end where they would alone."""
    with monkeypatch.context() as patch:
        crash_at_step(patch, 6, alone=True)
        with pytest.raises(RuntimeError, match="killed"):
            train_vae(member_config(weights_dir, MEMBERS["vae"], device=device), tmp_path / "vae")
    assert checkpoints.load(tmp_path / "vae" / "last.pt")["step"] == 4
    bad = member_config(weights_dir, MEMBERS["beta"], "trainer.lr=1e30", device=device)
    configs = {"vae": member_config(weights_dir, MEMBERS["vae"], device=device), "bad": bad}
    configs["beta"] = member_config(weights_dir, MEMBERS["beta"], device=device)
    jobs = [lambda c=c, d=tmp_path / name: train_vae(c, d) for name, c in configs.items()]
    (vae, ok_vae), (_, failed), (beta, ok_beta) = run_stacked(jobs)
    assert ok_vae is None and ok_beta is None and vae["status"] == beta["status"] == "finished"
    assert "non-finite" in str(failed)
    assert json.loads((tmp_path / "bad" / "config.json").read_text())["trainer"]["lr"] == 1e30
    assert_same_run(tmp_path / "vae", alone / "vae")
    assert_same_run(tmp_path / "beta", alone / "beta")


def hydra_config(*overrides):
    from hydra import compose, initialize_config_dir

    from semvae.config import register_configs

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_jobs_share_a_stack_when_they_differ_only_in_seed_name_and_loss():
    key = stack_key(hydra_config("trainer=smoke"))
    assert key is not None
    carried = ["loss.beta=5", "loss.semantic_weight=10", "loss.semantic.directions=axis", "seed=3", "name=x"]
    assert stack_key(hydra_config("trainer=smoke", *carried)) == key
    for other in (["trainer.epochs=3"], ["model.latent_dim=8"], ["runtime.precision=bf16"]):
        assert stack_key(hydra_config("trainer=smoke", *other)) not in (key, None), other
    assert stack_key(hydra_config("trainer=smoke", "task=train_classifier")) is None  # not a VAE training
    assert stack_key(hydra_config("trainer=smoke", "loss.beta=-1")) is None  # fails in its own process, saying why
    assert device_of(hydra_config("trainer=smoke")) == "cpu"


def test_the_launcher_decides_devices_without_initialising_cuda(monkeypatch):
    """runtime.device=auto is decided through NVML: the CUDA runtime's device count, which initialises the driver
    (and makes the processes forked afterwards unable to use CUDA), is never called."""

    def initialises(*_):
        raise AssertionError("the launcher initialised CUDA")

    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "0")
    monkeypatch.setattr(torch.cuda, "_is_compiled", lambda: True)
    monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", initialises)
    monkeypatch.setattr(torch.cuda, "_lazy_init", initialises)
    config = hydra_config("trainer=smoke", "runtime.device=auto")
    for count, device in ((1, "cuda"), (0, "cpu")):
        monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda count=count: count)
        assert device_of(config) == device
    assert not torch.cuda.is_initialized()
