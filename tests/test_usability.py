"""What a user sees: run names that say what was trained, progress with an ETA, data folders left clean, notebooks
and reports that refuse to report on nothing."""

import pytest

from semvae.variants import SEMANTIC_PRESET_WEIGHT, run_name
from tests.conftest import compose_config


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ((), "VAE"),
        (("variant=beta",), "b5-VAE"),
        (("variant=semantic",), "semanticVAE"),
        (("loss.beta=5", "loss.semantic_weight=0"), "b5-VAE"),
        (("loss.beta=1", "loss.semantic_weight=1"), "semanticVAE-l1"),
        (("loss.beta=5", "loss.semantic_weight=1"), "b5-semanticVAE-l1"),
        (("variant=semantic", "loss.semantic_weight=100"), "semanticVAE-l100"),
        (("variant=semantic", "loss.semantic.normalize=false"), "semanticVAE-raw"),
        (("loss.semantic_weight=400", "loss.semantic.normalize=false"), "semanticVAE-l400-raw"),
        (("experiment=semantic_raw",), "semanticVAE-l400-raw"),  # the lambda study's raw arm
        (
            ("experiment=sweep_beta_semantic", "loss.beta=2", "loss.semantic_weight=100", "seed=1"),
            "b2-semanticVAE-l100_s1",
        ),
        (
            ("experiment=sweep_beta_semantic", "loss.semantic_weight=400", "loss.semantic.normalize=false"),
            "semanticVAE-l400-raw_s0",
        ),
        (("loss.semantic.normalize=false",), "VAE"),
        (("loss.beta=0.5",), "b0.5-VAE"),
        (("task=train_classifier",), "classifier"),
        (("name=mine", "loss.beta=5"), "mine"),
    ],
)
def test_a_run_is_named_after_the_loss_it_trains(overrides, name):
    assert compose_config(*overrides).name == name


def test_the_semantic_preset_keeps_the_shipped_name():
    preset = compose_config("variant=semantic").loss
    assert preset.semantic_weight == SEMANTIC_PRESET_WEIGHT
    assert run_name(preset.beta, preset.semantic_weight) == "semanticVAE"


def test_a_failed_download_leaves_no_empty_data_folder(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    from semvae.data import DataError, load_split

    def offline_download(self):  # the network boundary: torchvision creates raw/, starts a file, then fails
        raw = tmp_path / "data" / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        (raw / "train-images-idx3-ubyte.gz").write_bytes(b"partial")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(MNIST, "download", offline_download)
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="could not be fetched"):
        load_split("mnist", tmp_path / "data", train=True, download=True)
    assert list((tmp_path / "data").iterdir()) == []  # the existing root stays, nothing below it


def test_notebooks_refuse_a_folder_without_runs_and_read_relative_folders_from_the_root(tmp_path, monkeypatch):
    from analysis.collect import RunFileError, load_runs
    from analysis.notebooks import ROOT, NoRuns, load_vae_runs, runs_source

    with pytest.raises(RunFileError, match="no such folder of runs: .*does/not/exist"):
        load_runs("does/not/exist")
    monkeypatch.setenv("SEMVAE_RUNS", "tests/fixtures/runs")  # as typed in the repository root
    monkeypatch.chdir(ROOT / "analysis")  # where Jupyter starts a notebook's kernel
    assert runs_source() == str(ROOT / "tests" / "fixtures" / "runs")
    assert len(load_vae_runs()[1]) == 12
    monkeypatch.setenv("SEMVAE_RUNS", str(tmp_path))
    with pytest.raises(NoRuns, match=f"no finished VAE runs in {tmp_path}"):
        load_vae_runs()


def test_a_smoke_run_is_never_averaged_with_a_full_run(tmp_path):
    import json
    import shutil

    from analysis.collect import collect_runs
    from analysis.report import grouping_keys
    from analysis.tables import comparison_table
    from tests.conftest import ROOT

    for run in ("0", "1"):  # two seeds of the same setting in the fixtures ...
        shutil.copytree(ROOT / "tests" / "fixtures" / "runs" / run, tmp_path / run)
    config = json.loads((tmp_path / "1" / "config.json").read_text())
    config["trainer"]["limit_train_batches"] = 3  # ... one of them a smoke run
    (tmp_path / "1" / "config.json").write_text(json.dumps(config))
    runs = collect_runs(tmp_path)
    keys = grouping_keys(runs)
    assert "trainer.limit_train_batches" in keys
    table = comparison_table(runs, by=keys, metrics=["test/mse"])
    assert len(table) == 2 and list(table[("test/mse", "n")]) == [1, 1]


def test_a_change_floor_outside_zero_to_one_is_refused_by_name():
    from semvae.config import ConfigError

    assert compose_config("evaluation.change_floor=1e-6").evaluation.change_floor == 1e-6
    with pytest.raises(ConfigError, match=r"evaluation.change_floor=1.5: must be in \[0, 1\)"):
        compose_config("evaluation.change_floor=1.5")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("variant=semantik", "variant=semantik: no such option; available: beta, semantic, vae"),
        ("task=evalute", "task=evalute: no such option; available: evaluate, reproduce, train_classifier, train_vae"),
        ("loss.beta=abc", "loss.beta=abc: Value 'abc' of type 'str' could not be converted to Float"),
        ("logger.mode=onlin", "logger.mode=onlin: Invalid value 'onlin', expected one of [offline, online, disabled]"),
    ],
)
def test_a_config_that_does_not_compose_is_one_line_naming_the_override(override, message):
    from hydra.errors import ConfigCompositionException, MissingConfigException

    from run import composition_error

    with pytest.raises((ConfigCompositionException, MissingConfigException)) as info:
        compose_config(override)
    assert composition_error(info.value) == message


@pytest.mark.parametrize("override", ["+trainer.epoch=3", "+foo=1"])
def test_an_added_key_must_exist_too(override, capsys):
    from run import check_override_keys

    with pytest.raises(SystemExit) as info:
        check_override_keys([override])
    assert info.value.code == 2 and "unknown config key" in capsys.readouterr().err
    check_override_keys(["+experiment=reproduce", "hydra.run.dir=x"])  # adding a group option is fine


def test_a_failed_notebook_keeps_the_last_good_one(tmp_path, monkeypatch):
    from nbclient.exceptions import CellExecutionError

    from analysis.notebooks import execute

    good = tmp_path / "sweep_report.ipynb"
    good.write_text("the last good notebook")
    monkeypatch.setenv("SEMVAE_RUNS", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CellExecutionError, match="NoRuns"):
        execute("sweep_report", out=good, timeout=120)
    assert good.read_text() == "the last good notebook"
    assert "no finished VAE runs" in (tmp_path / "sweep_report.failed.ipynb").read_text()
