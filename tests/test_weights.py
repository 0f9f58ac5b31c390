"""Every model shipped in weights/ is the file its manifest describes and still measures what was recorded."""

import json
import re

import pytest
import torch

from semvae import checkpoints
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
    if name.startswith("lambda/"):  # the lambda study's models: lambda in the name is the one they trained with
        lam = float(re.search(r"-l(\d+(?:\.\d+)?)_", name).group(1))
        assert checkpoints.load(ROOT / "weights" / name)["config"]["loss"]["semantic_weight"] == lam
