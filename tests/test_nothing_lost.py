"""Nothing lost, nothing executed, in-process: files that would run code, non-finite checkpoints, W&B failing
mid-run, torn metrics lines, damaged data, bad seeds, model files given as training checkpoints, export paths that
cannot be written, run files that cannot be read. The faults that need a real process are in test_faults.py."""

import gzip
import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from analysis.collect import RunFileError, collect_runs
from analysis.report import write_report
from semvae import checkpoints, rundir
from semvae.config import ConfigError, validate
from semvae.data import DataError, Split, load_split
from semvae.losses import vae_objective
from semvae.models import ResNetVAE
from semvae.stopping import StopFlag, StopRequested, check
from semvae.tasks.checks import check_inputs, check_resumable, check_writable
from semvae.tracking import Tracker
from semvae.training import NonFiniteLossError
from tests.conftest import DATA_DIR, ROOT, compose_raw, train_loop
from tests.conftest import compose_config as config

WEIGHTS = ROOT / "weights"


class Payload:
    """Unpickling this runs ``open(marker, "w")``: what a crafted checkpoint would do with a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def crafted(path: Path, marker: Path, **entries) -> Path:
    torch.save({"model": {"w": torch.zeros(1)}, **entries, "payload": Payload(marker)}, path)
    return path


def test_a_file_whose_pickle_runs_code_is_refused_by_every_loader_and_nothing_runs(tmp_path):
    marker = tmp_path / "marker"
    path = crafted(tmp_path / "evil.pt", marker, kind="vae", optimizer={}, epoch=1, step=1, rng={})
    loaders = [checkpoints.load, checkpoints.load_training_state, checkpoints.load_vae, checkpoints.load_classifier]
    for load in loaders:
        refused = rf"refused to load {path}: it holds a Python object \(io\.open\)"
        with pytest.raises(checkpoints.CheckpointError, match=refused):
            load(path)
    assert not marker.exists()
    with pytest.raises(checkpoints.CheckpointError, match="refused to load"):  # the resume check of run.py
        check_resumable(config("trainer=smoke", f"trainer.resume={path}"), path)
    assert not marker.exists()


def test_a_plain_pickle_or_an_empty_file_as_a_checkpoint_is_named_without_torchs_warning(tmp_path):
    import pickle
    import warnings

    plain, empty = tmp_path / "last.pt", tmp_path / "best.pt"
    plain.write_bytes(pickle.dumps({"model": {}, "epoch": 1}))  # protocol 5: torch says "Unsupported operand 149"
    empty.write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's warning about the pickle protocol would fail the test
        with pytest.raises(checkpoints.CheckpointError) as refused:
            checkpoints.load_training_state(plain)
        assert str(refused.value) == (
            f"cannot read checkpoint {plain}: it is not a file torch.save wrote (neither a zip archive nor torch's "
            "legacy format)"
        )
        with pytest.raises(checkpoints.CheckpointError, match=f"^cannot read checkpoint {empty}: it is empty$"):
            checkpoints.load(empty)
    legacy = tmp_path / "legacy.pt"  # torch's format before 1.6 still loads
    torch.save({"model": {"w": torch.ones(2)}}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(checkpoints.load(legacy)["model"]["w"], torch.ones(2))


@pytest.mark.parametrize("name", ["VAE_epoch50.pth", "classifier.pth", "judge.pth", "seeds/VAE_seed1_epoch50.pth"])
def test_every_shipped_file_loads_with_weights_only(name):
    state = checkpoints.load(WEIGHTS / name)  # torch.load(weights_only=True)
    model, _ = (checkpoints.load_vae if state["kind"] == "vae" else checkpoints.load_classifier)(WEIGHTS / name)
    loaded = model.state_dict()  # the architecture the file names, with every one of its tensors
    assert loaded.keys() == state["model"].keys()
    assert all(torch.equal(loaded[k], v) for k, v in state["model"].items())


def test_a_model_file_given_as_a_training_checkpoint_is_named_and_explained():
    path = WEIGHTS / "VAE_epoch50.pth"
    with pytest.raises(checkpoints.CheckpointError, match=f"{path} is a model file, not a training checkpoint"):
        check_resumable(config("trainer=smoke", f"trainer.resume={path}"), path)


def test_a_resume_with_other_settings_names_each_differing_key(tmp_path):
    state = {"model": {}, "optimizer": {}, "epoch": 1, "step": 1, "rng": {}}
    path = tmp_path / "last.pt"
    checkpoints.save_atomic(state | {"config": _plain(config("variant=semantic"))}, path)
    with pytest.raises(checkpoints.CheckpointError) as refused:
        check_resumable(config("variant=vae"), path)
    assert "loss.semantic_weight: 10.0 -> 0.0" in str(refused.value)
    assert "loss.beta" not in str(refused.value)  # equal settings are not listed


def test_a_checkpoint_from_before_a_setting_existed_resumes_at_that_settings_default(tmp_path):
    state = {"model": {}, "optimizer": {}, "epoch": 1, "step": 1, "rng": {}}
    written = _plain(config("variant=semantic"))
    del written["loss"]["semantic"]["reduced_precision"]  # as a checkpoint of an earlier version holds it
    path = tmp_path / "last.pt"
    checkpoints.save_atomic(state | {"config": written}, path)
    assert check_resumable(config("variant=semantic"), path)["step"] == 1
    with pytest.raises(checkpoints.CheckpointError, match=r"loss.semantic.reduced_precision: False -> True"):
        check_resumable(config("variant=semantic", "loss.semantic.reduced_precision=true"), path)


def _plain(cfg):
    from semvae.config import as_plain

    return as_plain(cfg)


def _tiny_fit(run_dir: Path, step_fn, **kwargs):
    images = (torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    data = Split(images, torch.zeros(64, dtype=torch.long))
    model = ResNetVAE(4, (4, 8, 8), 1)
    settings = dict(epochs=1, batch_size=16, lr=1e-3, log_every=1, checkpoint_every=1)
    train_loop(
        run_dir, model, data, data, step_fn, lambda m, x, y: vae_objective(m, x, 1.0, 0.0), **(settings | kwargs)
    )
    return model


class InfiniteGradient(torch.autograd.Function):
    """The identity, whose gradient is infinite: the update that follows makes the weights non-finite while the
    loss that was logged for the step is still finite."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_weights_that_go_non_finite_are_never_checkpointed(tmp_path):
    calls = []

    def step(model, x, y):
        calls.append(1)
        terms = vae_objective(model, x, 1.0, 0.0)
        if len(calls) == 3:
            weight = next(model.parameters())
            terms["loss"] = terms["loss"] + (InfiniteGradient.apply(weight) - weight.detach()).sum()
        return terms

    with pytest.raises(NonFiniteLossError, match="non-finite weights after step 3"):
        _tiny_fit(tmp_path, step)
    state = checkpoints.load(tmp_path / "last.pt")
    assert state["step"] == 2 and checkpoints.all_finite(state["model"], state["optimizer"]["state"])


def test_resumed_training_counts_the_time_of_every_segment(tmp_path):
    def step(model, x, y):
        return vae_objective(model, x, 1.0, 0.0)

    _tiny_fit(tmp_path, step, epochs=1)
    first = checkpoints.load(tmp_path / "last.pt")["seconds"]
    assert first > 0
    _tiny_fit(tmp_path, step, epochs=2, resume=tmp_path / "last.pt")
    assert checkpoints.load(tmp_path / "last.pt")["seconds"] > first


def test_a_stop_signal_is_a_flag_checked_by_long_work_and_ctrl_c_counts():
    before = signal.getsignal(signal.SIGINT)
    with StopFlag() as flag:
        check("nothing to save")  # no signal yet: no stop
        with StopFlag() as inner:
            assert inner is flag  # a task inside run.py's flag shares it
        signal.raise_signal(signal.SIGINT)  # Ctrl-C
        assert flag.signum == signal.SIGINT
        with pytest.raises(StopRequested, match="SIGINT received: rows saved"):
            check("rows saved")
    assert signal.getsignal(signal.SIGINT) is before  # the handler of before the flag is back


def test_stale_temporary_files_are_removed_by_the_next_save(tmp_path):
    orphan = tmp_path / ".last.pt.k1ll3d.tmp"  # what kill -9 during a save leaves
    orphan.write_bytes(b"partial")
    checkpoints.save_atomic({"model": {}}, tmp_path / "last.pt")
    assert not orphan.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert oct(os.stat(tmp_path / "last.pt").st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_wandb_failing_mid_run_ends_wandb_not_the_run(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("W&B cannot make folders below a file")
    monkeypatch.setenv("WANDB_DATA_DIR", str(blocker / "wandb"))  # where W&B stages artifacts
    tracker = Tracker(tmp_path / "run", {"a": 1}, mode="offline")
    assert tracker.run is not None
    model = tmp_path / "run" / "model.pth"
    model.write_bytes(b"weights")
    tracker.log_checkpoint(model, "VAE", {})
    tracker.log({"loss": 1.0}, step=1)
    tracker.update_summary({"status": "finished"})
    tracker.finish()
    assert "W&B failed while logging the model as an artifact" in caplog.text
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "finished"
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["loss"] == 1.0


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    tracker = Tracker(tmp_path, {}, mode="disabled")
    tracker.log({"loss": 1.0}, step=1)
    tracker.log({"loss": 2.0}, step=2)
    with open(tracker.metrics_path, "a") as f:
        f.write('{"step": 3, "lo')  # a kill or a full disk mid-line
    with caplog.at_level(logging.WARNING):
        tracker.forget_after(2)
    assert [json.loads(line)["step"] for line in tracker.metrics_path.read_text().splitlines()] == [1, 2]
    assert "line 3 is damaged and is dropped" in caplog.text


def _mnist_copy(tmp_path: Path) -> Path:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        for split in ("t10k", "train"):
            (raw / f"{split}-{name}").symlink_to(DATA_DIR / "MNIST" / "raw" / f"{split}-{name}")
    return raw


def _replace(path: Path, data: bytes) -> None:
    path.unlink()  # a link to the pre-staged file: replace the link, not the file
    path.write_bytes(data)


def test_a_truncated_dataset_file_is_named_as_damaged(tmp_path):
    raw = _mnist_copy(tmp_path)
    images = raw / "t10k-images-idx3-ubyte"
    data = images.read_bytes()
    _replace(images, data[: len(data) // 2])
    with pytest.raises(DataError, match=f"{images} is damaged: {len(data) // 2} bytes where its header announces"):
        load_split("mnist", tmp_path, train=False, download=False)


def test_a_file_that_is_not_what_its_name_says_is_named(tmp_path):
    raw = _mnist_copy(tmp_path)
    images, labels = raw / "t10k-images-idx3-ubyte", raw / "t10k-labels-idx1-ubyte"
    _replace(labels, (raw / "train-labels-idx1-ubyte").read_bytes())  # another split's labels
    with pytest.raises(DataError, match=f"{labels} holds 23797 labels for 10000 images in {images}"):
        load_split("mnist", tmp_path, train=False, download=False)
    _replace(labels, gzip.compress((raw / "train-labels-idx1-ubyte").read_bytes()))  # compressed, not renamed
    with pytest.raises(DataError, match=f"{labels} is gzip-compressed: decompress it"):
        load_split("mnist", tmp_path, train=False, download=False)
    _replace(labels, b"\xff\xff" + (raw / "train-labels-idx1-ubyte").read_bytes()[2:])
    with pytest.raises(DataError, match=f"{labels} is not an IDX file"):
        load_split("mnist", tmp_path, train=False, download=False)
    labels.rename(raw / "t10k-labels-idx1-ubyte.gz")  # only a .gz where the file belongs
    with pytest.raises(DataError, match=r"lacks t10k-labels-idx1-ubyte; t10k-labels-idx1-ubyte.gz there must be deco"):
        load_split("mnist", tmp_path, train=False, download=False)
    assert len(load_split("mnist", tmp_path, train=True, download=False)) >= 23_797  # the other split still loads


def test_labels_out_of_range_are_named_before_training(tmp_path):
    raw = _mnist_copy(tmp_path)
    labels = raw / "t10k-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[8 + 5] = 255  # the sixth label
    _replace(labels, bytes(data))
    with pytest.raises(DataError, match="labels must be in 0..9; label 255 at index 5"):
        load_split("mnist", tmp_path, train=False, download=False)


@pytest.mark.parametrize("key", ["seed", "evaluation.seed", "data.split_seed", "classifier.seed"])
def test_a_seed_torch_cannot_take_is_named(key):
    cfg = OmegaConf.to_object(compose_raw(f"{key}=99999999999999999999"))
    with pytest.raises(ConfigError, match=rf"^{key}=99999999999999999999: must be an integer in \[0, 2\*\*63 - 1024\)"):
        validate(cfg)


def test_an_export_path_that_cannot_be_written_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=f"task.export='{blocker}/VAE.pth': {blocker} is not a folder"):
        check_writable("task.export", blocker / "VAE.pth")
    long = tmp_path / ("x" * 300 + ".pth")
    with pytest.raises(ConfigError, match="is longer than 255 bytes"):
        check_inputs(config("trainer=smoke", f"task.export={long}"), tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # the checks leave nothing behind


def test_a_run_may_write_its_own_export_again_but_not_another_runs(tmp_path):
    export = tmp_path / "VAE.pth"
    checkpoints.save_atomic({"model": {}, "run_dir": str(tmp_path / "run")}, export)
    check_inputs(config("trainer=smoke", f"task.export={export}"), tmp_path / "run")  # killed after its export
    with pytest.raises(ConfigError, match="exists; pass task.overwrite=true"):
        check_inputs(config("trainer=smoke", f"task.export={export}"), tmp_path / "other")


def test_the_run_dir_lock_names_its_holder_and_is_held_once(tmp_path):
    run_dir = rundir.hold(tmp_path / "run")
    try:
        holder = json.loads((run_dir / ".lock").read_text())
        assert holder["pid"] == os.getpid()
        rundir.hold(run_dir)  # held already: no-op
        with rundir.held(run_dir):
            pass
        assert run_dir in rundir._held  # a block inside keeps the outer hold
    finally:
        rundir.release(run_dir)
    rundir.check_free(run_dir)


def test_default_run_and_sweep_dirs_end_with_the_launch_id():
    cfg = compose_raw(hydra=True)
    run, sweep = str(cfg.hydra.run.dir), str(cfg.hydra.sweep.dir)
    launch = rundir.launch_id()
    assert len(launch) == 6 and run.endswith(f"_VAE_{launch}") and sweep.endswith(f"_{launch}")


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def test_report_names_a_damaged_run_file_and_reads_nan_metrics(tmp_path):
    config_ = {"seed": 0, "loss": {"beta": 1.0, "semantic_weight": 0.0}, "task": {"name": "train"}}
    for seed, mig in ((0, "nan"), (1, 0.2)):
        _write(tmp_path / "runs" / str(seed) / "config.json", config_ | {"seed": seed})
        _write(tmp_path / "runs" / str(seed) / "summary.json", {"status": "finished", "test/mig": mig, "val/mse": 0.1})
    frame = collect_runs(tmp_path / "runs")
    assert frame["test/mig"].isna().sum() == 1 and frame["test/mig"].dtype == float
    write_report(tmp_path / "runs", tmp_path / "report")  # the figures draw around the NaN
    _write(tmp_path / "runs" / "1" / "summary.json", '{"status": "finis')
    with pytest.raises(RunFileError, match=f"cannot read {tmp_path / 'runs' / '1' / 'summary.json'}"):
        collect_runs(tmp_path / "runs")


def test_report_counts_a_settings_and_seed_once_and_says_when_a_group_has_one_seed(tmp_path, caplog):
    vae = {"seed": 0, "variant": "vae", "loss": {"beta": 1.0, "semantic_weight": 0.0}, "task": {"name": "train_vae"}}
    beta = vae | {"variant": "beta", "loss": {"beta": 5.0, "semantic_weight": 0.0}}
    first, rerun = tmp_path / "runs" / "2026-01-01" / "vae_s0", tmp_path / "runs" / "2026-01-02" / "vae_s0"
    runs = {first: (vae, 0.1), rerun: (vae, 0.1), tmp_path / "runs" / "2026-01-01" / "vae_s1": (vae | {"seed": 1}, 0.3)}
    runs[tmp_path / "runs" / "2026-01-01" / "beta_s0"] = (beta, 0.5)
    for folder, (config_, mse) in runs.items():  # the rerun of a sweep: only its folder and logger group differ
        _write(folder / "config.json", config_ | {"logger": {"group": folder.parent.name}, "paths": {"root": "x"}})
        _write(folder / "summary.json", {"status": "finished", "test/mse": mse})
    _write(rerun / "summary.json", {"status": "finished", "test/mse": 0.1, "val/mse": 0.2})
    with caplog.at_level(logging.WARNING, logger="analysis.collect"):
        frame = collect_runs(tmp_path / "runs")
    assert sorted(frame["run"]) == sorted(str(f) for f in runs if f != rerun)
    assert frame.loc[frame["run"] == str(first), "val/mse"].item() == 0.2  # what only the rerun measured is kept
    assert f"{first} and {rerun} hold the same settings and seed 0: counted once, as {first}" in caplog.text
    text = write_report(tmp_path / "runs", tmp_path / "report").read_text()
    assert "- finished runs: 3 (vae: 2, beta: 1)" in text and "- seeds: 2 (0, 1)" in text
    assert "| vae | 1.0 | 2 | 0.2 ± " in text  # two seeds: 0.1 and 0.3, not 0.1, 0.1 and 0.3
    assert "Read from one seed, so the mean alone and no interval: beta 5.0." in text


def test_report_names_a_summary_nested_too_deeply_and_an_object_npy_in_one_line(tmp_path, capsys):
    import numpy as np

    from analysis.report import main

    config_ = {"seed": 0, "variant": "vae", "loss": {"beta": 1.0, "semantic_weight": 0.0}, "task": {"name": "train"}}
    for seed in (0, 1):
        _write(tmp_path / "runs" / str(seed) / "config.json", config_ | {"seed": seed})
        _write(tmp_path / "runs" / str(seed) / "summary.json", {"status": "finished", "test/mse": 0.1 + seed})
        np.save(tmp_path / "runs" / str(seed) / "latent_norms.npy", np.linspace(1, 3, 5, dtype=np.float32))
    out = str(tmp_path / "report")
    assert not main([str(tmp_path / "runs"), "--out", out])
    capsys.readouterr()
    norms = tmp_path / "runs" / "1" / "latent_norms.npy"
    np.save(norms, np.array([{"a": 1}, None], dtype=object))  # would unpickle Python objects
    assert main([str(tmp_path / "runs"), "--out", out]) == 2
    error = capsys.readouterr().err
    assert error == f"error: cannot read {norms}: Object arrays cannot be loaded when allow_pickle=False\n"
    norms.unlink()
    deep = tmp_path / "runs" / "1" / "summary.json"
    _write(deep, "[" * 100_000 + "]" * 100_000)  # Python's parser recurses once per level
    assert main([str(tmp_path / "runs"), "--out", out]) == 2
    nested = f"error: cannot read {deep}: nested too deeply (no run writes more than a few levels)\n"
    assert capsys.readouterr().err == nested


def test_a_stop_during_the_evaluation_after_training_keeps_the_training_and_resumes_with_the_evaluation(
    tmp_path, monkeypatch
):
    from semvae.evaluation.suite import EvaluationBench
    from semvae.tasks.train_vae import train_vae

    settings = [
        "trainer=smoke",
        "logger=none",
        "task.evaluate=true",
        "evaluation.judges=[morpho]",
        "evaluation.limit_test=100",
        "evaluation.n_points=10",
        "evaluation.morpho_points=4",
        "evaluation.n_random_directions=1",
        "evaluation.n_pairs=2",
    ]
    run_dir = tmp_path / "run"
    real_evaluate = EvaluationBench.evaluate

    def signalled_evaluate(bench, vae):
        signal.raise_signal(signal.SIGTERM)  # arrives while the trained model is being evaluated
        return real_evaluate(bench, vae)

    monkeypatch.setattr(EvaluationBench, "evaluate", signalled_evaluate)
    with StopFlag(), pytest.raises(StopRequested, match="SIGTERM received: training is complete"):
        train_vae(config(*settings), run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["stopped_at_step"] == 6
    assert not (run_dir / "model.pth").exists()

    monkeypatch.setattr(EvaluationBench, "evaluate", real_evaluate)
    with StopFlag():
        summary = train_vae(config(*settings), run_dir)
    assert summary["status"] == "finished" and summary["steps"] == 6 and "test/gsv_norm_morpho" in summary
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1] == 6
