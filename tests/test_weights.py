"""Every model shipped in weights/ is the file its manifest describes and still measures what was recorded."""

import json
import re
import shutil

import pytest
import torch

from semvae import checkpoints, manifest
from semvae.data import load_split
from semvae.manifest import check_value, sha256
from tests.conftest import DATA_DIR, ROOT

MANIFEST = json.loads((ROOT / "weights" / "manifest.json").read_text())


def test_every_shipped_file_is_in_the_manifest():
    weights = ROOT / "weights"
    assert sorted(p.relative_to(weights).as_posix() for p in weights.rglob("*.pth")) == sorted(MANIFEST)


@pytest.fixture(scope="module")
def mnist_test():
    return load_split("mnist", DATA_DIR, train=False, download=False)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_shipped_weights_reproduce_their_recorded_check(name, mnist_test):
    record, path = MANIFEST[name], ROOT / "weights" / name
    assert sha256(path) == record["sha256"]
    start, stop = record["check"]["test_slice"]
    test = mnist_test.subset(torch.arange(start, stop))
    metric, value = check_value(path, test)
    assert metric == record["check"]["metric"]
    assert value == pytest.approx(record["check"]["value"], abs=1e-5)
    if "epoch" in name:  # a file name that says epochN holds a model trained for N epochs
        assert re.search(r"_epoch(\d+)\.pth$", name).group(1) == str(record["epochs"])
    seed = re.search(r"_seed(\d+)_", name)
    if seed:  # seeds/NAME_seedS_epochN.pth, lambda/NAME_seedS_epochN.pth hold seed S
        assert seed.group(1) == str(record["seed"])
    else:  # the models at the top are seed 0
        assert record["kind"] != "vae" or record["seed"] == 0
    if name.startswith("lambda/"):  # the lambda study's models: lambda (and -raw) in the name is what they trained with
        lam, raw = re.search(r"-l(\d+(?:\.\d+)?)(-raw)?_", name).groups()
        loss = checkpoints.load(ROOT / "weights" / name)["config"]["loss"]
        assert loss["semantic_weight"] == float(lam) and loss["semantic"]["normalize"] == (raw is None)


def test_the_manifest_keeps_recorded_entries_and_measures_new_files_and_other_checks(tmp_path, monkeypatch):
    """``python -m semvae.manifest``: a file already recorded keeps its entry; one whose check was made on another
    test slice or with another metric is checked again (the rest of its entry kept), once the old check still holds;
    a new or changed file is measured in full."""
    monkeypatch.setattr(manifest, "SLICE", 8)
    weights = tmp_path / "weights"
    (weights / "seeds").mkdir(parents=True)
    shutil.copy(ROOT / "weights" / "classifier.pth", weights / "classifier.pth")
    shutil.copy(ROOT / "weights" / "VAE_epoch50.pth", weights / "seeds" / "VAE_seed0_epoch50.pth")
    path = manifest.write_manifest(weights, DATA_DIR)
    first = json.loads(path.read_text())
    assert sorted(first) == ["classifier.pth", "seeds/VAE_seed0_epoch50.pth"]
    assert first["classifier.pth"]["sha256"] == MANIFEST["classifier.pth"]["sha256"]
    split = load_split("mnist", DATA_DIR, train=False, download=False)
    test = split.subset(torch.arange(8))
    for name, record in first.items():
        assert record["check"]["test_slice"] == [0, 8]
        assert (record["check"]["metric"], record["check"]["value"]) == check_value(weights / name, test)
    assert first["classifier.pth"]["check"]["metric"] == "nll" and 0 < first["classifier.pth"]["check"]["value"] < 0.5

    checks = {name: record["check"] for name, record in first.items()}
    accuracy = manifest.measure(weights / "classifier.pth", split.subset(torch.arange(20)))[1]["accuracy"]
    older = {  # checks made the way earlier versions made them, with the values those made
        "classifier.pth": {"metric": "accuracy", "test_slice": [0, 20], "value": accuracy},
        "seeds/VAE_seed0_epoch50.pth": {
            "metric": "mse",
            "test_slice": [0, 20],
            "value": check_value(weights / "seeds" / "VAE_seed0_epoch50.pth", split.subset(torch.arange(20)))[1],
        },
    }
    path.write_text(
        json.dumps({name: record | {"created": "kept", "check": older[name]} for name, record in first.items()})
    )
    second = json.loads(manifest.write_manifest(weights, DATA_DIR).read_text())
    for name, record in second.items():
        assert record["created"] == "kept" and record["check"] == checks[name]  # checked anew, the rest kept
    assert json.loads(manifest.write_manifest(weights, DATA_DIR).read_text()) == second  # now current: kept as is

    wrong = second | {"classifier.pth": second["classifier.pth"] | {"check": older["classifier.pth"] | {"value": 0.5}}}
    path.write_text(json.dumps(wrong))
    with pytest.raises(manifest.ManifestError, match=r"classifier.pth: its recorded accuracy on test images \[0, 20\]"):
        manifest.write_manifest(weights, DATA_DIR)
    assert json.loads(path.read_text()) == wrong  # nothing written

    path.write_text(json.dumps(second))
    shutil.copy(ROOT / "weights" / "b5-VAE_epoch50.pth", weights / "seeds" / "VAE_seed0_epoch50.pth")  # a changed file
    third = json.loads(manifest.write_manifest(weights, DATA_DIR).read_text())["seeds/VAE_seed0_epoch50.pth"]
    assert third["sha256"] == MANIFEST["b5-VAE_epoch50.pth"]["sha256"] and third["created"] != "kept"


@pytest.mark.parametrize(
    ("recorded", "status", "message"),
    [
        ("{", 2, "cannot read {manifest}: Expecting property name"),
        ("[" * 100_000 + "]" * 100_000, 2, "cannot read {manifest}: maximum recursion depth exceeded"),
        ([], 2, "{manifest} is not a manifest: one object per model file expected"),
        ({"VAE.pth": 5}, 2, "{manifest} is not a manifest: one object per model file expected"),
        ({"check": "x"}, 2, "{manifest}: the check recorded for VAE.pth is damaged: not an object"),
        ({"check": {"metric": "mse", "test_slice": [0, 10**12], "value": 1}}, 2, "test_slice must be [start, stop] wi"),
        ({"check": {"metric": ["mse"], "test_slice": [0, 3], "value": 1}}, 2, "its metric must be a name and its val"),
        ({"check": {"metric": "mse", "test_slice": [0, 3], "value": 1}}, 1, "its recorded mse on test images [0, 3] w"),
        (None, 2, "cannot read checkpoint {weights}/evil.pth: it is not a file torch.save wrote"),
    ],
)
def test_the_manifest_command_names_a_crafted_file_in_one_line(
    tmp_path, monkeypatch, capsys, recorded, status, message
):
    """A damaged manifest, a recorded check no version writes (a slice of a trillion images would be allocated), a
    check that no longer holds, a model file that is not one: one line on stderr, exit 2 (1: the check failed), and
    the manifest as it was."""
    monkeypatch.setattr(manifest, "SLICE", 4)
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(ROOT / "weights" / "VAE_epoch50.pth", weights / "VAE.pth")
    path = weights / "manifest.json"
    if recorded is None:
        (weights / "evil.pth").write_bytes(b"\x80\x04K\x01.")  # a plain pickle
    elif isinstance(recorded, dict) and "check" in recorded:
        entry = {"sha256": sha256(weights / "VAE.pth"), "kind": "vae"}
        path.write_text(json.dumps({"VAE.pth": entry | recorded}))
    else:
        path.write_text(recorded if isinstance(recorded, str) else json.dumps(recorded))
    before = path.read_text() if path.exists() else None
    assert manifest.main(["--weights", str(weights), "--data", str(DATA_DIR)]) == status
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1
    assert message.format(manifest=path, weights=weights) in err
    assert (path.read_text() if path.exists() else None) == before
