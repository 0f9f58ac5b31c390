"""``python run.py task=evaluate`` end to end on the shipped seed-0 models, their classifier and held-out judge
(``weights/``, read only: the evaluation writes into its run dir): in this process, but for the stop signal."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.report import write_report
from semvae import checkpoints as ckpt
from semvae.checkpoints import CheckpointError
from semvae.config import ConfigError
from semvae.data import load_split
from semvae.evaluation.report import TABLE_COLUMNS
from semvae.tasks.checks import check_inputs
from semvae.tasks.evaluate import evaluate_models, evaluation_settings, kept_rows
from tests.conftest import DATA_DIR, ROOT, compose_config, read_summary, run_in_process, wandb_inspect

WEIGHTS = ROOT / "weights"
MODELS = {"vae": WEIGHTS / "VAE_epoch50.pth", "semantic": WEIGHTS / "semanticVAE_epoch50.pth"}


@pytest.mark.slow  # trains (and evaluates or stacks): tens of seconds
def test_evaluate_writes_table_figures_and_per_model_json(tmp_path, wandb_offline):
    run_dir = tmp_path / "eval"
    checkpoints = ",".join(str(p) for p in MODELS.values())
    ended = run_in_process(
        "task=evaluate",
        f"evaluation.checkpoints=[{checkpoints}]",
        f"paths.weights_dir={WEIGHTS}",
        "evaluation.limit_test=120",
        "evaluation.n_points=10",
        "evaluation.morpho_points=4",
        "evaluation.n_random_directions=1",
        "evaluation.n_pairs=3",
        "runtime.device=cpu",
        run_dir=run_dir,
    )
    assert ended.returncode == 0, ended.stderr
    frame = pd.read_csv(run_dir / "comparison.csv")
    assert list(frame["model"]) == ["VAE_epoch50", "semanticVAE_epoch50"]
    assert list(frame["variant"]) == ["vae", "semantic"]
    for key, _ in TABLE_COLUMNS:
        assert key in frame.columns, key
        assert frame[key].notna().all(), key
    for judge in ("train", "heldout", "morpho"):
        assert (frame[f"gsv_norm_{judge}"].between(0, 1)).all() and (frame[f"gsv_raw_{judge}"] > 0).all()
        assert (frame[f"gsv_norm_{judge}_se"] > 0).all()
        for step in ("0.5", "1", "2"):
            assert f"gsv_norm_{judge}_step{step}" in frame.columns
    # the reconstruction error, the active units and φ's reading of the reconstructions are those of each model on
    # the first 120 test images
    test = load_split("mnist", DATA_DIR, train=False, download=False).images[:120]
    phi, _ = ckpt.load_classifier(WEIGHTS / "classifier.pth")
    for i, path in enumerate(MODELS.values()):
        vae, _ = ckpt.load_vae(path)
        with torch.no_grad():
            mu = vae.encode(test)[0]
            recon = torch.sigmoid(vae.decode(mu))
            read = torch.bincount(phi(recon).argmax(1), minlength=10)
        assert frame["mse"][i] == pytest.approx((recon - test).pow(2).mean().item(), rel=1e-4)
        assert frame["active_units"][i] == int((mu.var(dim=0) > 0.01).sum())
        assert frame["recon_top_class"][i] == read.argmax() and frame["recon_top_class_share"][i] == read.max() / 120
        assert read.max() < 30  # the shipped models' reconstructions are read as many digits
    table = (run_dir / "comparison.md").read_text()
    assert table.count("\n") == 6 and "GSV norm (held-out)" in table and " ± " in table  # header, rule, 2 rows, note
    assert "two-way bootstrap" in table and "shuffled ref. (mlp)" in table and "acc. on recon. (cnn)" in table
    for name in ("VAE_epoch50", "semanticVAE_epoch50"):
        details = json.loads((run_dir / "models" / f"{name}.json").read_text())
        assert details["model"] == name and details["config"]["model"]["latent_dim"] == 16
        for figure in (f"interpolations_{name}.png", f"traversals_{name}.png"):
            assert (run_dir / figure).stat().st_size > 100
    assert (run_dir / "latent_norms.png").stat().st_size > 10_000 and (run_dir / "gsv.png").is_file()
    names = ("VAE_epoch50", "semanticVAE_epoch50")
    grids = {f"{kind}_{name}.png" for kind in ("interpolations", "traversals") for name in names}
    assert {p.name for p in run_dir.glob("*.png")} == grids | {"latent_norms.png", "gsv.png"}  # each figure once
    summary = read_summary(run_dir)
    assert summary["n_test"] == 120 and summary["VAE_epoch50/mse"] == pytest.approx(frame["mse"][0], rel=1e-9)
    logged = wandb_inspect(run_dir)  # W&B holds the same summary
    assert logged["state"] == "finished" and logged["summary"]["n_test"] == 120
    assert logged["summary"]["semanticVAE_epoch50/mse"] == pytest.approx(frame["mse"][1], rel=1e-9)


def _evaluate(tmp_path, *overrides):
    """The evaluation task in-process, with the shipped classifiers; returns its run dir."""
    config = compose_config("task=evaluate", f"paths.weights_dir={WEIGHTS}", "logger=none", *overrides)
    check_inputs(config, tmp_path / "run")
    evaluate_models(config, tmp_path / "run")


def test_evaluate_names_the_missing_file(tmp_path):
    missing = tmp_path / "nojudge.pth"
    with pytest.raises(ConfigError, match=f"evaluation.heldout_checkpoint: not found: {missing}"):
        _evaluate(tmp_path, f"evaluation.checkpoints=[{MODELS['vae']}]", f"evaluation.heldout_checkpoint={missing}")
    wrong = tmp_path / "not_a_vae.pth"
    wrong.write_bytes((WEIGHTS / "classifier.pth").read_bytes())
    with pytest.raises(CheckpointError, match=f"{wrong} is not a VAE model file"):
        _evaluate(tmp_path, f"evaluation.checkpoints=[{wrong}]")
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_evaluate_rejects_a_classifier_that_does_not_match_its_config(tmp_path):
    refused = (
        rf"{WEIGHTS}/classifier.pth does not match the configured model \(widths: checkpoint \[16, 32, 64\] vs "
        rf"config \[8, 16, 32\]\)"
    )
    with pytest.raises(CheckpointError, match=refused):
        _evaluate(tmp_path, f"evaluation.checkpoints=[{MODELS['vae']}]", "classifier.widths=[8,16,32]")
    assert not (tmp_path / "run").exists()


def test_rows_are_kept_by_what_the_judges_are_not_where_they_lie(tmp_path):
    """The settings a stored row must match hold the judges' content, not their paths (with ``kept_rows``, which
    matches the model files by content too, a folder of evaluated rows made on one checkout is kept on another);
    another judge file is another setting."""
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name in ("classifier.pth", "judge.pth", "judge_mlp.pth", "judge_cnn.pth"):
        (moved / name).write_bytes((WEIGHTS / name).read_bytes())
    here = evaluation_settings(compose_config("task=evaluate", f"paths.weights_dir={WEIGHTS}"))
    there = evaluation_settings(compose_config("task=evaluate", f"paths.weights_dir={moved}"))
    assert here == there and not any(str(WEIGHTS) in str(v) or str(moved) in str(v) for v in here.values())
    (moved / "judge.pth").write_bytes((WEIGHTS / "classifier.pth").read_bytes())
    assert evaluation_settings(compose_config("task=evaluate", f"paths.weights_dir={moved}")) != here


def test_a_stored_row_is_kept_for_the_same_file_content_and_settings_wherever_the_file_lies(tmp_path):
    settings = {"n_points": 10, "metrics_version": 2}
    for name, digest, stored_settings in [("a", "aa", settings), ("b", "bb", settings), ("c", "cc", {"n_points": 9})]:
        row = {"model": name, "checkpoint": f"/elsewhere/{name}.pth", "checkpoint_sha256": digest, "mse": 0.5}
        (tmp_path / f"{name}.json").write_text(json.dumps(row | {"config": {}, "settings": stored_settings}))
        np.save(tmp_path / f"{name}_latent_norms.npy", np.full(3, 2.0, dtype=np.float32))
    (tmp_path / "d.json").write_text((tmp_path / "a.json").read_text())  # a row without its latent norms
    files = {"a": ("weights/a.pth", "aa"), "b": ("weights/b.pth", "changed"), "c": ("c.pth", "cc"), "d": ("d", "aa")}
    rows, norms = kept_rows(tmp_path, files, settings)
    assert list(rows) == ["a"] and list(norms) == ["a"]  # b: another file; c: other settings; d: no norms
    assert rows["a"] == {"model": "a", "checkpoint": "weights/a.pth", "checkpoint_sha256": "aa", "mse": 0.5}
    assert norms["a"].tolist() == [2.0, 2.0, 2.0]


def test_a_damaged_stored_row_or_norms_file_is_named_and_its_model_evaluated_again(tmp_path, caplog):
    settings = {"n_points": 10}
    damaged = {
        "torn": ('{"model": "torn", "checkpoint_sha256": "a', np.ones(3)),
        "list": ("[1, 2]", np.ones(3)),
        "deep": ("[" * 100_000 + "]" * 100_000, np.ones(3)),
        "objects": (None, np.array([{"a": 1}], dtype=object)),  # np.load would have to unpickle it
        "good": (None, np.ones(3)),
    }
    for name, (text, norms) in damaged.items():
        row = {"model": name, "checkpoint_sha256": name, "mse": 0.5, "settings": settings}
        (tmp_path / f"{name}.json").write_text(text if text is not None else json.dumps(row))
        np.save(tmp_path / f"{name}_latent_norms.npy", norms)
    files = {name: (f"{name}.pth", name) for name in damaged}
    with caplog.at_level(logging.WARNING, logger="semvae.tasks.evaluate"):
        rows, norms = kept_rows(tmp_path, files, settings)
    assert list(rows) == ["good"] and list(norms) == ["good"]  # the four others are measured again
    for file in ("torn.json", "list.json", "deep.json", "objects_latent_norms.npy"):
        assert f"{tmp_path / file} cannot be read (" in caplog.text, file
    assert caplog.text.count("; its model is evaluated again") == 4


@pytest.mark.slow
def test_sigterm_stops_an_evaluation_within_seconds_and_the_same_command_evaluates_only_the_rest(tmp_path, caplog):
    run_dir = tmp_path / "eval"
    files = [WEIGHTS / "VAE_epoch50.pth", WEIGHTS / "semanticVAE_epoch50.pth"]
    args = [
        "task=evaluate",
        f"evaluation.checkpoints=[{','.join(map(str, files))}]",
        f"paths.weights_dir={WEIGHTS}",
        "evaluation.limit_test=100",
        "evaluation.n_points=12",  # the rest of the evaluation (seconds) outlasts the signal (milliseconds)
        "evaluation.morpho_points=4",
        "evaluation.n_random_directions=1",
        "evaluation.steps=[1.0]",
        "runtime.device=cpu",
        "logger=none",
        f"hydra.run.dir={run_dir}",
    ]
    env = os.environ | {"SEMVAE_DATA_DIR": str(DATA_DIR)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], env=env, stderr=subprocess.PIPE, text=True)
    first = run_dir / "models" / "VAE_epoch50.json"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert time.time() - signalled < 20  # not the minutes the rest of the evaluation would take
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM received: 1 of 2 models evaluated" in stderr and "Traceback" not in stderr
    assert "to continue: python run.py task=evaluate" in stderr
    summary = read_summary(run_dir)
    assert summary["status"] == "stopped" and summary["evaluated"] == ["VAE_epoch50"]

    report = write_report(run_dir, tmp_path / "report")  # the stopped evaluation is reported as partial
    text = report.read_text()
    assert "- finished runs: 1 (vae: 1)" in text and "- unfinished runs (left out): 1 (stopped)" in text

    row = first.stat()
    caplog.set_level(logging.INFO, logger="semvae.tasks.evaluate")
    again = run_in_process(*args)  # the same command, once Hydra has started (in this process)
    assert again.returncode == 0, again.stderr
    assert "kept the rows already written in" in caplog.text and ": VAE_epoch50" in caplog.text
    evaluated = [r.args[0] for r in caplog.records if r.getMessage().startswith("evaluating ") and r.args]
    assert evaluated == ["semanticVAE_epoch50"]  # not the first model again
    assert "2 models on 100 test images (1 measured, 1 kept from an earlier run)" in caplog.text
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == (row.st_ino, row.st_mtime_ns)  # its row not rewritten
    assert read_summary(run_dir)["status"] == "finished"
    table = pd.read_csv(run_dir / "comparison.csv")
    assert list(table["model"]) == [p.stem for p in files]
    assert list(table.columns[:3]) == ["model", "variant", "epochs"]  # a kept row's columns in the order measured

    # a row measured by an older version of the evaluation lacks what was added since: it is measured again
    saved = json.loads(first.read_text())
    saved["settings"]["metrics_version"] -= 1
    del saved["recon_top_class_share"]
    first.write_text(json.dumps(saved))
    caplog.clear()
    assert run_in_process(*args).returncode == 0
    evaluated = [r.args[0] for r in caplog.records if r.getMessage().startswith("evaluating ") and r.args]
    assert evaluated == ["VAE_epoch50"] and "recon_top_class_share" in json.loads(first.read_text())
