"""The record kept next to the shipped models: ``weights/manifest.json``.

For every model file (``*.pth``) in ``weights/`` and its subfolders (``seeds/``): its SHA-256, what it is, how it
was made (commit, seed, epochs, data), and one number measured on a fixed slice of the test split (the first
``SLICE`` images): per-pixel reconstruction MSE for a VAE, accuracy for a classifier. ``tests/test_weights.py``
loads each file and checks that number again.

    python -m semvae.manifest            # (re)write weights/manifest.json for the files in weights/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from semvae import checkpoints
from semvae.data import Split, load_split

SLICE = 256  # the first test images: enough to tell any change of the weights, cheap enough to check every file


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@torch.no_grad()
def check_value(path: str | Path, test: Split) -> tuple[str, float]:
    """(metric, value) of a model file on ``test``: "mse" for a VAE, "accuracy" for a classifier."""
    kind = checkpoints.load(path).get("kind")
    if kind == "vae":
        from semvae.evaluation.metrics import decode_images, latent_means, squared_errors

        vae, _ = checkpoints.load_vae(path)
        vae.to(memory_format=torch.channels_last)  # as the evaluation runs it: the same value, about 1.7x faster
        recon = decode_images(vae, latent_means(vae, test.images))
        return "mse", squared_errors(recon, test.images).mean().item()
    if kind == "classifier":
        net, _ = checkpoints.load_classifier(path)
        net.to(memory_format=torch.channels_last)
        return "accuracy", (net(test.images).argmax(1) == test.labels).float().mean().item()
    raise checkpoints.CheckpointError(f"{path}: unknown model kind {kind!r}")


def entry(path: Path, test: Split) -> dict[str, Any]:
    state = checkpoints.load(path)
    metric, value = check_value(path, test)
    summary = state.get("summary", {})
    return {
        "sha256": sha256(path),
        "kind": state.get("kind"),
        "variant": state.get("variant"),
        "seed": (state.get("config") or {}).get("seed"),
        "architecture": state.get("architecture"),
        "epochs": summary.get("epochs"),
        "n_train": state.get("n_train"),
        "commit": state.get("commit"),
        "dirty": state.get("dirty"),
        "created": state.get("created"),
        "check": {"metric": metric, "test_slice": [0, len(test)], "value": value},
    }


def write_manifest(weights_dir: str | Path, data_root: str | Path) -> Path:
    """Write ``manifest.json`` for every ``*.pth`` below ``weights_dir``. A file whose SHA-256 is the one recorded
    keeps its entry as it was (its check value is the one measured when it was added); new or changed files are
    measured now, and a kept entry whose check was made on another slice than ``SLICE`` is checked again on it."""
    weights_dir = Path(weights_dir)
    path = weights_dir / "manifest.json"
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    test = load_split("mnist", data_root, train=False, download=False)
    test = test.subset(torch.arange(SLICE))
    manifest = {}
    for file in sorted(weights_dir.rglob("*.pth")):
        name = file.relative_to(weights_dir).as_posix()
        kept = recorded.get(name)
        if kept is None or kept.get("sha256") != sha256(file):
            manifest[name] = entry(file, test)
        elif kept["check"]["test_slice"] != [0, SLICE]:
            metric, value = check_value(file, test)
            manifest[name] = kept | {"check": {"metric": metric, "test_slice": [0, SLICE], "value": value}}
        else:
            manifest[name] = kept
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description="Write weights/manifest.json")
    parser.add_argument("--weights", default=str(root / "weights"))
    parser.add_argument("--data", default=os.environ.get("SEMVAE_DATA_DIR", str(root / "data")))
    args = parser.parse_args(argv)
    print(write_manifest(args.weights, args.data))


if __name__ == "__main__":
    main()
