"""``python run.py experiment=reproduce`` end to end at smoke size, through run.py's ``main`` in this process (the task
reads Hydra's overrides and composes its stages' configs): every stage, the file names, the skip of finished stages on
a second call, and the table over seeds that ``analysis.report`` makes of its evaluation."""

import json
import logging

import pytest

from analysis.collect import collect_runs
from analysis.report import write_report
from semvae import checkpoints
from semvae.tasks.reproduce import Composer, passed_on
from tests.conftest import ROOT, compose_config, preflight, run_in_process

SMOKE = (
    "trainer=smoke",
    "model.widths=[8,8,16]",
    "trainer.limit_train_batches=1",
    "trainer.limit_eval_batches=1",
    "reproduce.epochs=1",
    "reproduce.classifier_epochs=1",
    "reproduce.seeds=[0,1]",
    "logger=none",
    "evaluation.limit_test=100",
    "evaluation.n_points=12",
    "evaluation.morpho_points=4",
    "evaluation.n_random_directions=1",
    "evaluation.steps=[1.0]",
    "evaluation.n_pairs=2",
)


def test_overrides_a_stage_sets_itself_are_not_passed_on():
    given = ["experiment=reproduce", "seed=3", "reproduce.seeds=[0]", "trainer.epochs=2", "+foo.bar=1", "variant=beta"]
    assert passed_on(given) == ["trainer.epochs=2", "+foo.bar=1"]


def test_a_stage_config_is_the_one_its_overrides_compose_to():
    """Hydra composes a variant once for all its seeds; each seed's config is still the one run.py would run."""
    from hydra import initialize_config_dir

    common = ["trainer=smoke", "model.widths=[8,8,16]"]
    overrides = ["task=train_vae", "variant=beta", "trainer.epochs=3"]
    values = {"seed": 2, "task.export": "/w/seeds/b5-VAE_seed2_epoch3.pth"}
    expected = compose_config(*common, *overrides, "seed=2", "task.export=/w/seeds/b5-VAE_seed2_epoch3.pth")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        compose = Composer(common)
        seed0 = compose(overrides)
        assert compose(overrides, values) == expected
        assert compose(overrides) == seed0  # setting one stage's values leaves the shared composition as it was
        assert len(compose.composed) == 1
    assert seed0.seed == 0 and expected.seed == 2 and expected.task.export.endswith("seed2_epoch3.pth")


@pytest.mark.slow  # trains (and evaluates or stacks): tens of seconds
def test_reproduce_trains_every_stage_then_evaluates_and_resumes_by_skipping(tmp_path, caplog):
    weights, out = tmp_path / "weights", tmp_path / "out"
    args = ("experiment=reproduce", *SMOKE, f"paths.weights_dir={weights}", f"paths.output_dir={out}")
    ended = run_in_process(*args)
    assert ended.returncode == 0, ended.stderr
    run_dir = out / "reproduce"
    expected = ["VAE_epoch1.pth", "b5-VAE_epoch1.pth", "classifier.pth", "judge.pth", "judge_cnn.pth", "judge_mlp.pth"]
    expected.append("semanticVAE_epoch1.pth")
    assert sorted(p.name for p in weights.glob("*.pth")) == expected
    seeds = sorted(p.name for p in (weights / "seeds").glob("*.pth"))
    assert seeds == ["VAE_seed1_epoch1.pth", "b5-VAE_seed1_epoch1.pth", "semanticVAE_seed1_epoch1.pth"]
    b5 = checkpoints.load(weights / "seeds" / "b5-VAE_seed1_epoch1.pth")
    assert b5["config"]["seed"] == 1 and b5["config"]["loss"]["beta"] == 5.0 and b5["summary"]["epochs"] == 1
    semantic = checkpoints.load(weights / "semanticVAE_epoch1.pth")
    assert semantic["config"]["classifier"]["checkpoint"] == str(weights / "classifier.pth")
    mlp = checkpoints.load(weights / "judge_mlp.pth")  # reproduce.classifier_epochs=1 holds for every classifier
    assert mlp["architecture"]["arch"] == "mlp" and mlp["summary"]["epochs"] == 1
    for stage in ("classifier_classifier", "classifier_judge", "classifier_mlp", "classifier_cnn", "VAE_s0"):
        assert json.loads((run_dir / stage / "summary.json").read_text())["status"] == "finished", stage

    models = collect_runs(run_dir / "evaluation")
    models = models[models["model"].notna()]
    assert sorted(models["variant"]) == ["beta", "beta", "semantic", "semantic", "vae", "vae"]
    assert sorted(models["seed"]) == [0, 0, 0, 1, 1, 1]
    assert models["test/mse"].notna().all() and models["test/gsv_norm_heldout"].gt(0).all()
    for variant, rows in models.groupby("variant"):  # each row measures its own model: the seeds differ
        assert rows["test/mse"].nunique() == 2, variant

    report = write_report(run_dir / "evaluation", tmp_path / "report", by_metric=True)
    text = report.read_text()
    assert "- finished runs: 6 (vae: 2, beta: 2, semantic: 2)" in text  # the evaluation run itself is no row
    assert "| metric | vae 1.0 0.0 (n=2) | beta 5.0 0.0 (n=2) | semantic 1.0 10.0 (n=2) |" in text
    assert "| test/gsv_raw_morpho | " in text and "| test/latent_norm_mean | " in text
    assert (tmp_path / "report" / "latent_norms.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "interpolations.png").stat().st_size > 5_000

    before = {p: p.stat().st_mtime_ns for p in weights.rglob("*.pth")}
    caplog.set_level(logging.INFO, logger="semvae.tasks.reproduce")
    again = run_in_process(*args, "reproduce.evaluate=false")
    assert again.returncode == 0, again.stderr
    assert caplog.text.count("exists, skipped") == 10
    assert {p: p.stat().st_mtime_ns for p in weights.rglob("*.pth")} == before


def test_reproduce_rejects_an_unknown_variant_before_any_work(tmp_path):
    ended = run_in_process(
        "experiment=reproduce",
        "reproduce.variants=[vae,betta]",
        f"paths.weights_dir={tmp_path}/weights",
        f"paths.output_dir={tmp_path}/out",
    )
    assert ended.returncode == 2
    assert "variant=betta" in ended.stderr and "beta" in ended.stderr
    assert not (tmp_path / "weights").exists()
    refused = preflight(
        "experiment=reproduce", "reproduce.classifiers=[classifier,judg]", f"paths.output_dir={tmp_path}/o"
    )
    message = "reproduce.classifiers=['classifier', 'judg']: allowed values: classifier, judge, mlp, cnn"
    assert refused.returncode == 2 and message in refused.stderr
    assert not (tmp_path / "o").exists()
