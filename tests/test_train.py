import pytest
import torch

from semvae import checkpoints
from semvae.data import Split
from semvae.losses import vae_objective
from semvae.models import ResNetVAE
from semvae.tracking import Tracker
from semvae.training import NonFiniteLossError
from tests.conftest import train_loop


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 1, 28, 28, generator=g) > 0.7).float()
    return Split(images, torch.zeros(n, dtype=torch.long))


def _vae_step(model, x, _y):
    return vae_objective(model, x, beta=1.0, semantic_weight=0.0)


def _train(run_dir, epochs, resume=None, step_fn=_vae_step):
    torch.manual_seed(0)
    model = ResNetVAE(4, (4, 8, 8), 1)
    tracker = Tracker(run_dir, config={}, mode="disabled")
    result = train_loop(
        run_dir,
        model,
        _data(),
        _data(32, seed=1),
        step_fn,
        _vae_step,
        tracker=tracker,
        resume=resume,
        epochs=epochs,
        batch_size=16,
        lr=1e-3,
        seed=0,
        log_every=2,
    )
    return model, result


def test_checkpoint_holds_what_resuming_needs(tmp_path):
    _, result = _train(tmp_path, epochs=2)
    state = checkpoints.load(result.last_checkpoint)
    assert {"model", "optimizer", "epoch", "step", "rng", "history", "best_epoch"} <= set(state)
    assert state["epoch"] == 2 and state["step"] == 2 * (96 // 16)
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    best = min(state["history"], key=lambda h: h["val/loss"])["epoch"]  # the epoch of the lowest validation loss
    assert state["best_epoch"] == best and checkpoints.load(tmp_path / "best.pt")["epoch"] == best
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 3 + 2  # 6 steps a epoch logged every 2 steps, plus one record per epoch


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    straight, _ = _train(tmp_path / "straight", epochs=3)
    _train(tmp_path / "split", epochs=1)
    torch.manual_seed(123)  # the global RNG is restored from the checkpoint, whatever it is now
    resumed, result = _train(tmp_path / "resumed", epochs=3, resume=tmp_path / "split" / "last.pt")
    assert result.steps == 3 * 6
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_non_finite_loss_stops_with_the_step_and_terms(tmp_path):
    def exploding(model, x, y):
        terms = _vae_step(model, x, y)
        terms["loss"] = terms["loss"] * float("nan")
        return terms

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 2 \(epoch 1\): recon=.*loss=nan"):
        _train(tmp_path, epochs=1, step_fn=exploding)


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoints.save_atomic({"model": {"w": torch.ones(2)}}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_atomic({"model": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoints.load(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_corrupt_checkpoint_error_names_the_file(tmp_path):
    path = tmp_path / "bad.pt"
    checkpoints.save_atomic({"model": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(checkpoints.CheckpointError, match=f"cannot read checkpoint {path}"):
        checkpoints.load(path)


def test_saved_files_get_ordinary_permissions(tmp_path):
    path = checkpoints.save_atomic({"model": {}}, tmp_path / "m.pth")
    assert path.stat().st_mode & 0o777 == 0o666 & ~checkpoints._umask()


def test_bf16_on_a_device_without_native_bf16_is_warned_about(monkeypatch, caplog):
    from semvae import runtime

    threads = torch.get_num_threads()
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    with caplog.at_level("WARNING", logger="semvae.runtime"):
        runtime.setup("cpu", None, "bf16")
    assert "runtime.precision=bf16: cpu has no native bfloat16" in caplog.text
    caplog.clear()
    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)
    runtime.setup("cpu", None, "bf16")
    assert caplog.text == "" and torch.get_num_threads() == threads


def test_fp32_means_ieee_float32_on_gpus_too():
    from semvae.runtime import resolve_device

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        assert resolve_device("cpu") == torch.device("cpu")
        assert torch.backends.cudnn.allow_tf32 is False
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_the_run_time_is_estimated_at_the_first_log_point_not_after_an_epoch(tmp_path, caplog):
    """The first estimate of the whole run comes after `log_every` steps (2 of 6 an epoch here), before any epoch
    line, and counts every step left."""
    import logging

    caplog.set_level(logging.INFO, logger="semvae.training.trainer")
    _train(tmp_path, epochs=3)
    lines = [r.getMessage() for r in caplog.records]
    first = next(i for i, line in enumerate(lines) if "steps took" in line)
    assert lines[first].startswith("2 steps took ") and "; 16 of 18 left: eta " in lines[first]
    assert first < next(i for i, line in enumerate(lines) if line.startswith("epoch 1/3"))
    assert sum("steps took" in line for line in lines) == 1
