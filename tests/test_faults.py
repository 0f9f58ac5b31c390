"""Faults injected into real runs: kill -9, preemption signals, incompatible or damaged checkpoints, a diverging loss,
W&B failing to start. Nothing may be lost, and a resumed run must end where an uninterrupted one does.

The signals and the locks of concurrent runs need run.py's own process (marked slow); the rest runs run.py's code in
this process: its checks before Hydra starts (``preflight``) or its ``main`` (``run_in_process``)."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from semvae import checkpoints, rundir, stopping
from semvae.data import Split
from semvae.losses import vae_objective
from semvae.models import ResNetVAE
from semvae.stopping import STOP_SIGNALS, StopFlag, StopRequested
from semvae.tracking import Tracker
from tests.conftest import (
    DATA_DIR,
    ROOT,
    preflight,
    read_summary,
    run_in_process,
    run_py,
    torch_settings,
    train_loop,
    wandb_inspect,
)
from tests.test_nothing_lost import Payload

# long enough to be interrupted: 2 epochs of 32 batches of a small model, a checkpoint every 3 steps
LONG = [
    "trainer=smoke",
    "model.widths=[8,8,16]",
    "trainer.limit_train_batches=32",
    "trainer.checkpoint_every=3",
    "logger=none",
    "runtime.num_threads=1",  # a run in a process and one in this process compare bit for bit: same threads
]


def _start(run_dir, *extra):
    env = os.environ | {"SEMVAE_DATA_DIR": str(DATA_DIR), "WANDB_ERROR_REPORTING": "false"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *LONG, *extra, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_mid_epoch_checkpoint(proc, run_dir, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "last.pt").exists() and checkpoints.load(run_dir / "last.pt").get("position", 0) > 0:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before it could be interrupted:\n{proc.communicate()[1]}")
        time.sleep(0.01)
    raise AssertionError("no mid-epoch checkpoint appeared")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """LONG run from start to end without a stop, in this process."""
    run_dir = tmp_path_factory.mktemp("straight")
    with torch_settings():
        ended = run_in_process(*LONG, run_dir=run_dir)
    assert ended.returncode == 0, ended.stderr
    return run_dir


def _same_model(a, b):
    ma, mb = (checkpoints.load(d / "model.pth")["model"] for d in (a, b))
    return all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.slow
def test_kill_9_mid_epoch_then_the_same_command_finishes_the_same_run(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    _wait_for_mid_epoch_checkpoint(proc, run_dir)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = checkpoints.load(run_dir / "last.pt")
    assert killed_at["position"] > 0 and killed_at["step"] < 64
    (run_dir / ".last.pt.left-by-kill.tmp").write_bytes(b"partial")  # as a kill during a save leaves it
    again = run_in_process(*LONG, f"hydra.run.dir={run_dir}")  # the same command: the lock is free, the run goes on
    assert again.returncode == 0, again.stderr
    assert not list(run_dir.glob(".*.tmp"))
    assert read_summary(run_dir)["train_seconds"] > killed_at["seconds"]  # both segments count
    assert _same_model(run_dir, uninterrupted)
    assert read_summary(run_dir)["val/loss"] == read_summary(uninterrupted)["val/loss"]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) + 2  # no step twice (but each epoch's record)


@pytest.mark.parametrize("sig", STOP_SIGNALS)
def test_every_stop_signal_only_sets_the_flag_and_the_handlers_come_back(sig):
    """SIGTERM, Ctrl-C, and SLURM's notices (SIGUSR1, SIGUSR2) all become a stop request; nothing is interrupted."""
    before = signal.getsignal(sig)
    with StopFlag() as flag:
        os.kill(os.getpid(), sig)
        assert flag.signum == sig and stopping.requested() == sig
    assert signal.getsignal(sig) is before and stopping.requested() is None


@pytest.mark.slow
def test_preemption_signal_writes_a_checkpoint_and_exits_cleanly(tmp_path, uninterrupted):
    """Ctrl-C to a training run.py (the process test of one stop signal; the others set the same flag, above)."""
    sig = signal.SIGINT
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    _wait_for_mid_epoch_checkpoint(proc, run_dir)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    assert f"{signal.Signals(sig).name} received: checkpoint saved at step" in stderr
    assert f"to continue: python run.py {shlex.join(LONG)} data.root={DATA_DIR} hydra.run.dir={run_dir}\n" in stderr
    assert "Traceback" not in stderr
    summary = read_summary(run_dir)
    state = checkpoints.load(run_dir / "last.pt")
    assert summary["status"] == "stopped" and summary["stopped_at_step"] == state["step"]
    # continued elsewhere from that checkpoint, it ends where an uninterrupted run does
    resumed = run_in_process(*LONG, f"trainer.resume={run_dir / 'last.pt'}", run_dir=tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr
    assert _same_model(tmp_path / "resumed", uninterrupted)


def test_stop_flag_checkpoints_mid_epoch_and_resume_matches(tmp_path):
    images = (torch.rand(96, 1, 28, 28, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    data, val = Split(images, torch.zeros(96, dtype=torch.long)), Split(images[:32], torch.zeros(32, dtype=torch.long))

    def train(run_dir, stop=None, at=None, resume=None):
        torch.manual_seed(0)
        model = ResNetVAE(4, (4, 8, 8), 1)
        calls = []

        def step(m, x, y):
            calls.append(1)
            if stop is not None and len(calls) == at:
                stop.signum = signal.SIGTERM  # as if the signal arrived during this step
            return vae_objective(m, x, 1.0, 0.0)

        train_loop(
            run_dir,
            model,
            data,
            val,
            step,
            lambda m, x, y: vae_objective(m, x, 1.0, 0.0),
            resume=resume,
            stop=stop,
            epochs=2,
            batch_size=16,
            lr=1e-3,
            log_every=4,
            checkpoint_every=None,
        )
        return model

    straight = train(tmp_path / "a")
    with StopFlag() as stop, pytest.raises(StopRequested) as info:
        train(tmp_path / "b", stop=stop, at=8)  # epoch 2, batch 2
    assert info.value.step == 8
    state = checkpoints.load(tmp_path / "b" / "last.pt")
    assert (state["epoch"], state["position"], state["step"]) == (1, 2, 8)
    resumed = train(tmp_path / "b", resume=tmp_path / "b" / "last.pt")
    assert all(
        torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True)
    )


@pytest.mark.slow
def test_a_refused_run_changes_nothing(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)  # a finished run of LONG
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = run_py(*LONG, "loss.beta=5", "model.latent_dim=8", f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 2
    assert f"{run_dir} holds another run's files (settings differ:" in proc.stderr
    assert "loss.beta: 1.0 -> 5.0" in proc.stderr and "model.latent_dim: 16 -> 8" in proc.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # .hydra/ and run.log too


def test_a_crafted_checkpoint_is_refused_before_it_can_run_code(tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "last.pt"
    torch.save({"model": {}, "optimizer": {}, "epoch": 0, "step": 0, "rng": {}, "x": Payload(marker)}, evil)
    run_dir = tmp_path / "run"
    refused = preflight("trainer=smoke", "logger=none", f"trainer.resume={evil}", f"hydra.run.dir={run_dir}")
    assert refused.returncode == 2 and f"error: refused to load {evil}" in refused.stderr
    assert not marker.exists() and not run_dir.exists()


@pytest.mark.slow
def test_runs_started_together_get_their_own_folders(tmp_path):
    out = tmp_path / "out"
    args = ["trainer=smoke", "trainer.epochs=1", "trainer.limit_train_batches=2", "logger=none"]
    args.append(f"paths.output_dir={out}")
    procs = [_popen(*args, f"seed={seed}") for seed in (0, 1)]
    assert [proc.wait(timeout=300) for proc in procs] == [0, 0]
    runs = sorted((out / "runs").glob("*/*"))
    assert len(runs) == 2
    for run in runs:  # each folder's files are its own run's
        seed = json.loads((run / "config.json").read_text())["seed"]
        assert checkpoints.load(run / "model.pth")["config"]["seed"] == seed
        assert checkpoints.load(run / "last.pt")["config"]["seed"] == seed


def test_a_folder_held_by_another_run_is_refused_before_anything_is_written(tmp_path):
    held = tmp_path / "held"
    holder = subprocess.Popen(  # another process holds the folder, as a running run.py does
        [
            sys.executable,
            "-c",
            "import sys; from semvae import rundir; rundir.hold(sys.argv[1]); print(); input()",
            held,
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "\n"  # it holds the lock now
        refused = preflight("trainer=smoke", "logger=none", f"hydra.run.dir={held}")
    finally:
        holder.communicate("\n", timeout=60)
    assert refused.returncode == 2
    assert f"error: {held} is in use by another run (pid {holder.pid} on" in refused.stderr
    assert sorted(p.name for p in held.iterdir()) == [".lock"]


def _popen(*overrides):
    env = os.environ | {"SEMVAE_DATA_DIR": str(DATA_DIR), "WANDB_ERROR_REPORTING": "false"}
    env.pop(rundir.LAUNCH_ID_ENV, None)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *overrides],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MB file system: room for a run's small files, not for its checkpoints. Needs root (mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_ends_the_run_with_one_line_naming_the_file(tiny_disk):
    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * (2 * 1024 * 1024 - 400 * 1024))  # leaves less than a checkpoint (1 MB)
    run_dir = tiny_disk / "run"
    ended = run_in_process("trainer=smoke", "logger=none", run_dir=run_dir)  # an exception would fail the test here
    assert ended.returncode == 1, ended.stderr
    last = ended.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: [Errno 28] cannot write {run_dir}/last.pt: No space left on device"), last
    assert not list(run_dir.glob(".*.tmp"))


def test_damaged_checkpoint_is_named_and_nothing_runs(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02 not a checkpoint")
    refused = preflight("trainer=smoke", "logger=none", f"trainer.resume={bad}", f"hydra.run.dir={tmp_path}/run")
    assert refused.returncode == 2 and f"cannot read checkpoint {bad}" in refused.stderr
    assert not (tmp_path / "run").exists()


def test_a_learning_rate_that_blows_up_stops_the_run_and_writes_no_non_finite_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    ended = run_in_process(
        "trainer=smoke",
        "logger=none",
        "trainer.lr=1e30",
        "trainer.checkpoint_every=1",
        "trainer.log_every=1",
        "trainer.limit_train_batches=20",
        run_dir=run_dir,
    )
    assert ended.returncode == 1
    assert ended.stderr.startswith("error: non-finite ") and ended.stderr.count("\n") == 1  # weights or loss
    assert "checkpoint" not in ended.stderr or "no checkpoint was saved" in ended.stderr  # none was: none is claimed
    assert not (run_dir / "model.pth").exists()
    if (run_dir / "last.pt").exists():  # a finite step before the blow-up: kept, and finite
        state = checkpoints.load(run_dir / "last.pt")
        assert checkpoints.all_finite(state["model"], state["optimizer"]["state"])


def _logs_offline(tracker: Tracker, run_dir) -> None:
    """The tracker W&B fell back to offline logs there: its run, read back from its files, holds what was logged."""
    try:
        assert tracker.mode == "offline" and tracker.run is not None
        tracker.log({"loss": 0.25}, step=1)
    finally:
        tracker.finish()
    logged = wandb_inspect(run_dir)
    assert logged["state"] == "finished" and logged["config"]["a"] == 1 and logged["summary"]["loss"] == 0.25


def test_wandb_online_without_a_reachable_server_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # a key, but no server answers here
    _logs_offline(Tracker(tmp_path / "run", {"a": 1}, mode="online", init_timeout=3), tmp_path / "run")
    assert "W&B failed to start in online mode" in caplog.text


def test_wandb_online_without_a_key_logs_offline_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc either
    _logs_offline(Tracker(tmp_path / "run", {"a": 1}, mode="online"), tmp_path / "run")
    assert "no API key is configured; logging offline instead" in caplog.text
