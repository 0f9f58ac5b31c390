"""``python run.py task=evaluate`` end to end on the shipped seed-0 models, their classifier and held-out judge
(``weights/``, read only: the evaluation writes into its run dir)."""

import json

import pandas as pd

from semvae.comparison import TABLE_COLUMNS
from tests.conftest import ROOT, read_summary, run_py

WEIGHTS = ROOT / "weights"
MODELS = {"vae": WEIGHTS / "VAE_epoch50.pth", "semantic": WEIGHTS / "semanticVAE_epoch50.pth"}


def test_evaluate_writes_table_figures_and_per_model_json(tmp_path):
    run_dir = tmp_path / "eval"
    checkpoints = ",".join(str(p) for p in MODELS.values())
    run_py(
        "task=evaluate",
        f"evaluation.checkpoints=[{checkpoints}]",
        f"paths.weights_dir={WEIGHTS}",
        "evaluation.limit_test=300",
        "evaluation.n_points=60",
        "evaluation.morpho_points=12",
        "evaluation.n_random_directions=4",
        "evaluation.n_pairs=3",
        "trainer.device=cpu",
        f"hydra.run.dir={run_dir}",
    )
    frame = pd.read_csv(run_dir / "comparison.csv")
    assert list(frame["model"]) == ["VAE_epoch50", "semanticVAE_epoch50"]
    assert list(frame["variant"]) == ["vae", "semantic"]
    for key, _ in TABLE_COLUMNS:
        assert key in frame.columns, key
        assert frame[key].notna().all(), key
    for judge in ("train", "heldout", "morpho"):
        assert (frame[f"gsv_norm_{judge}"].between(0, 1)).all() and (frame[f"gsv_raw_{judge}"] >= 0).all()
        assert (frame[f"gsv_norm_{judge}_se"] > 0).all()
        for step in ("0.5", "1", "2"):
            assert f"gsv_norm_{judge}_step{step}" in frame.columns
    assert (frame["mse"] > 0).all() and (frame["mse"] < 1).all() and (frame["active_units"] <= 16).all()
    table = (run_dir / "comparison.md").read_text()
    assert table.count("\n") == 4 and "GSV norm (held-out)" in table and " ± " in table
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
    assert summary["n_test"] == 300 and summary["VAE_epoch50/mse"] == frame["mse"][0]
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_evaluate_names_the_missing_file(tmp_path):
    proc = run_py(
        "task=evaluate",
        f"evaluation.checkpoints=[{MODELS['vae']}]",
        f"evaluation.heldout_checkpoint={tmp_path}/nojudge.pth",
        f"paths.weights_dir={WEIGHTS}",
        f"hydra.run.dir={tmp_path}/run",
        check=False,
    )
    assert proc.returncode == 2
    assert f"evaluation.heldout_checkpoint: not found: {tmp_path}/nojudge.pth" in proc.stderr
    wrong = tmp_path / "not_a_vae.pth"
    wrong.write_bytes((WEIGHTS / "classifier.pth").read_bytes())
    proc = run_py(
        "task=evaluate",
        f"evaluation.checkpoints=[{wrong}]",
        f"paths.weights_dir={WEIGHTS}",
        f"hydra.run.dir={tmp_path}/run2",
        check=False,
    )
    assert proc.returncode == 2 and f"{wrong} is not a VAE model file" in proc.stderr


def test_evaluate_rejects_a_classifier_that_does_not_match_its_config(tmp_path):
    proc = run_py(
        "task=evaluate",
        f"evaluation.checkpoints=[{MODELS['vae']}]",
        "classifier.widths=[8,16,32]",
        f"paths.weights_dir={WEIGHTS}",
        f"hydra.run.dir={tmp_path}/run",
        check=False,
    )
    assert proc.returncode == 2
    assert f"{WEIGHTS}/classifier.pth does not match the configured model" in proc.stderr
    assert "widths: checkpoint [16, 32, 64] vs config [8, 16, 32]" in proc.stderr
