"""``python run.py experiment=reproduce`` end to end at smoke size: every stage, the file names, the skip of finished
stages on a second call, and the table over seeds that ``analysis.report`` makes of its evaluation."""

from analysis.collect import collect_runs
from analysis.report import write_report
from semvae import checkpoints
from semvae.tasks.reproduce import passed_on
from tests.conftest import run_py

SMOKE = (
    "trainer=smoke",
    "reproduce.epochs=1",
    "reproduce.classifier_epochs=1",
    "reproduce.seeds=[0,1]",
    "logger=none",
    "evaluation.limit_test=200",
    "evaluation.n_points=40",
    "evaluation.morpho_points=8",
    "evaluation.n_random_directions=2",
    "evaluation.n_pairs=2",
)


def test_overrides_a_stage_sets_itself_are_not_passed_on():
    given = ["experiment=reproduce", "seed=3", "reproduce.seeds=[0]", "trainer.epochs=2", "+foo.bar=1", "variant=beta"]
    assert passed_on(given) == ["trainer.epochs=2", "+foo.bar=1"]


def test_reproduce_trains_every_stage_then_evaluates_and_resumes_by_skipping(tmp_path):
    weights, out = tmp_path / "weights", tmp_path / "out"
    args = ("experiment=reproduce", *SMOKE, f"paths.weights_dir={weights}", f"paths.output_dir={out}")
    run_py(*args)
    run_dir = out / "reproduce"
    expected = ["VAE_epoch1.pth", "b5-VAE_epoch1.pth", "classifier.pth", "judge.pth", "semanticVAE_epoch1.pth"]
    assert sorted(p.name for p in weights.glob("*.pth")) == expected
    seeds = sorted(p.name for p in (weights / "seeds").glob("*.pth"))
    assert seeds == ["VAE_seed1_epoch1.pth", "b5-VAE_seed1_epoch1.pth", "semanticVAE_seed1_epoch1.pth"]
    b5 = checkpoints.load(weights / "seeds" / "b5-VAE_seed1_epoch1.pth")
    assert b5["config"]["seed"] == 1 and b5["config"]["loss"]["beta"] == 5.0 and b5["summary"]["epochs"] == 1
    semantic = checkpoints.load(weights / "semanticVAE_epoch1.pth")
    assert semantic["config"]["classifier"]["checkpoint"] == str(weights / "classifier.pth")
    for stage in ("classifier_classifier", "classifier_judge", "VAE_s0", "b5-VAE_s1", "semanticVAE_s1"):
        assert (run_dir / stage / "summary.json").is_file(), stage

    models = collect_runs(run_dir / "evaluation")
    models = models[models["model"].notna()]
    assert sorted(models["variant"]) == ["beta", "beta", "semantic", "semantic", "vae", "vae"]
    assert sorted(models["seed"]) == [0, 0, 0, 1, 1, 1]
    assert models["test/mse"].between(0, 1).all() and models["test/gsv_norm_heldout"].between(0, 1).all()

    report = write_report(run_dir / "evaluation", tmp_path / "report", by_metric=True)
    text = report.read_text()
    assert "- finished runs: 6 (vae: 2, beta: 2, semantic: 2)" in text  # the evaluation run itself is no row
    assert "| metric | vae 1.0 0.0 (n=2) | beta 5.0 0.0 (n=2) | semantic 1.0 10.0 (n=2) |" in text
    assert "| test/gsv_raw_morpho | " in text and "| test/latent_norm_mean | " in text
    assert (tmp_path / "report" / "latent_norms.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "interpolations.png").stat().st_size > 5_000

    before = {p: p.stat().st_mtime_ns for p in weights.rglob("*.pth")}
    proc = run_py(*args, "reproduce.evaluate=false")
    assert (proc.stdout + proc.stderr).count("exists, skipped") == 8
    assert {p: p.stat().st_mtime_ns for p in weights.rglob("*.pth")} == before


def test_reproduce_rejects_an_unknown_variant_before_any_work(tmp_path):
    proc = run_py(
        "experiment=reproduce",
        "reproduce.variants=[vae,betta]",
        f"paths.weights_dir={tmp_path}/weights",
        f"paths.output_dir={tmp_path}/out",
        check=False,
    )
    assert proc.returncode == 2
    assert "variant=betta" in proc.stderr and "beta" in proc.stderr
    assert not (tmp_path / "weights").exists()
    proc = run_py(
        "experiment=reproduce", "reproduce.classifiers=[classifier,judg]", f"paths.output_dir={tmp_path}/o", check=False
    )
    message = "reproduce.classifiers=['classifier', 'judg']: allowed values: classifier, judge"
    assert proc.returncode == 2 and message in proc.stderr
