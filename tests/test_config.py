"""Composition of conf/ against the typed schema, and early, named rejection of bad overrides."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import OmegaConfBaseException

from semvae.config import ConfigError, Directions, TaskName, register_configs
from tests.conftest import ROOT, compose_config, preflight, run_py

register_configs()


def test_variants_are_presets_over_the_loss():
    vae, beta, semantic = (compose_config(f"variant={v}") for v in ("vae", "beta", "semantic"))
    assert (vae.loss.beta, vae.loss.semantic_weight, vae.name) == (1.0, 0.0, "VAE")
    assert (beta.loss.beta, beta.loss.semantic_weight, beta.name) == (5.0, 0.0, "b5-VAE")
    assert semantic.loss.beta == 1.0 and semantic.loss.semantic_weight > 0 and semantic.name == "semanticVAE"
    assert compose_config("variant=beta", "loss.beta=2").loss.beta == 2.0  # command line wins over a preset


def test_any_key_is_overridable_and_typed():
    cfg = compose_config(
        "model.latent_dim=32",
        "trainer.epochs=5",
        "data=fashion_mnist",
        "logger=none",
        "seed=3",
        "loss.semantic.directions=axis",
        "loss.semantic.n_points=null",
    )
    assert cfg.model.latent_dim == 32 and cfg.trainer.epochs == 5 and cfg.seed == 3
    assert cfg.data.name.value == "fashion_mnist" and cfg.logger.mode.value == "disabled"
    assert cfg.loss.semantic.directions is Directions.axis and cfg.loss.semantic.n_points is None


def test_classifier_task_uses_its_trainer_and_exports_where_the_vae_finds_it():
    cfg = compose_config("task=train_classifier")
    assert cfg.task.name is TaskName.train_classifier and cfg.trainer.epochs < 50
    assert cfg.task.export == cfg.classifier.checkpoint == str(ROOT / "weights" / "classifier.pth")
    judge = compose_config("task=train_classifier", "classifier=judge")
    assert judge.task.export.endswith("weights/judge.pth") and judge.classifier.widths != cfg.classifier.widths
    assert compose_config("task=train_classifier", "trainer=smoke").trainer.limit_train_batches == 3


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("loss.betta=2", r"Key 'betta' not in 'LossConfig'[\s\S]*full_key: loss.betta"),
        ("trainer.epochs=many", r"trainer.epochs"),
        ("loss.semantic.directions=diagonal", r"Invalid value 'diagonal', expected one of \[random, axis\]"),
        (
            "variant=semantik",
            r"Could not find 'variant/semantik'[\s\S]*Available options in 'variant':"
            r"[\s\S]*beta[\s\S]*semantic[\s\S]*vae",
        ),
    ],
)
def test_bad_overrides_fail_while_composing_and_name_the_key(override, pattern):
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)) as info:
        compose_config(override)
    text = str(info.value) + str(info.value.__cause__ or "")
    assert __import__("re").search(pattern, text), text


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.beta=-1", "loss.beta=-1.0: must be finite and >= 0"),
        ("loss.semantic_weight=-0.5", "loss.semantic_weight=-0.5: must be finite and >= 0"),
        ("model.widths=[8,16]", "model.widths=[8, 16]: needs 3 entries"),
        ("runtime.device=tpu", "runtime.device='tpu': allowed values: auto, cpu, cuda, cuda:N"),
        ("loss.semantic.n_points=1", "loss.semantic.n_points=1: must be >= 2"),
    ],
)
def test_out_of_range_values_are_rejected_with_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        compose_config(override)
    assert message in str(info.value)


@pytest.mark.slow
def test_run_py_rejects_bad_input_before_any_training(tmp_path):
    # Python's import log on stderr shows what the process imported before it refused
    proc = run_py("loss.beta=-1", f"hydra.run.dir={tmp_path}/a", check=False, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 2 and "error: loss.beta=-1.0: must be finite and >= 0" in proc.stderr
    assert not (tmp_path / "a").exists()  # refused before Hydra makes the run dir
    imported = [line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "hydra" in imported and "torch" not in imported  # a wrong value is refused before torch is loaded


def test_a_misspelt_key_or_a_missing_classifier_is_refused_before_hydra_starts(tmp_path):
    refused = preflight("trainer.epochz=3", f"hydra.run.dir={tmp_path}/b")
    assert refused.returncode == 2 and "trainer.epochz" in refused.stderr
    assert not (tmp_path / "b").exists()
    # the semantic variant without its classifier says what to do
    refused = preflight("variant=semantic", f"paths.weights_dir={tmp_path}/none", f"hydra.run.dir={tmp_path}/c")
    assert refused.returncode == 2 and not (tmp_path / "c").exists()
    assert "classifier.checkpoint" in refused.stderr and "python run.py task=train_classifier" in refused.stderr


def test_the_sweep_evaluation_preset_keeps_the_gsv_definition_on_fewer_points():
    default, sweep = compose_config().evaluation, compose_config("evaluation=sweep").evaluation
    assert (sweep.n_points, sweep.morpho_points, sweep.limit_test) == (300, 100, 2000)
    same = ("n_random_directions", "steps", "seed", "judges", "resamples", "change_floor", "checkpoints")
    assert all(getattr(sweep, key) == getattr(default, key) for key in same)
    study = compose_config("experiment=sweep_beta_semantic")
    assert study.evaluation == sweep and study.task.evaluate
