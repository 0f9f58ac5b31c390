"""Every model shipped in weights/ is the file its manifest describes and still measures what was recorded."""

import json
import re

import pytest
import torch

from semvae.data import load_split
from semvae.manifest import check_value, sha256
from tests.conftest import DATA_DIR, ROOT

MANIFEST = json.loads((ROOT / "weights" / "manifest.json").read_text())


def test_every_shipped_file_is_in_the_manifest():
    weights = ROOT / "weights"
    assert sorted(p.relative_to(weights).as_posix() for p in weights.rglob("*.pth")) == sorted(MANIFEST)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_shipped_weights_reproduce_their_recorded_check(name):
    record, path = MANIFEST[name], ROOT / "weights" / name
    assert sha256(path) == record["sha256"]
    start, stop = record["check"]["test_slice"]
    test = load_split("mnist", DATA_DIR, train=False, download=False).subset(torch.arange(start, stop))
    metric, value = check_value(path, test)
    assert metric == record["check"]["metric"]
    assert value == pytest.approx(record["check"]["value"], abs=1e-5)
    if "epoch" in name:  # a file name that says epochN holds a model trained for N epochs
        assert re.search(r"_epoch(\d+)\.pth$", name).group(1) == str(record["epochs"])
    if name.startswith("seeds/"):  # seeds/NAME_seedS_epochN.pth holds seed S; the seed-0 models are at the top
        assert re.search(r"_seed(\d+)_", name).group(1) == str(record["seed"])
    elif record["kind"] == "vae":
        assert record["seed"] == 0
