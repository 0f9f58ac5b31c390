"""The record kept next to the shipped models: ``weights/manifest.json``.

For every model file (``*.pth``) in ``weights/`` and its subfolders (``seeds/``): its SHA-256, what it is, how it
was made (commit, seed, epochs, data), and one number measured on a fixed slice of the test split (the first
``SLICE`` images): per-pixel reconstruction MSE for a VAE, the cross-entropy of the true labels for a classifier
(continuous, so that any change of what the model computes shows, where an accuracy on easy digits may not move).
``tests/test_weights.py`` loads each file and checks that number again.

    python -m semvae.manifest            # (re)write weights/manifest.json for the files in weights/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from semvae import checkpoints
from semvae.data import DataError, Split, load_split

SLICE = 256  # the first test images: cheap enough to check every shipped file on every test run
CHECK_METRIC = {"vae": "mse", "classifier": "nll"}  # the number recorded for each kind of model


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class ManifestError(RuntimeError):
    """A shipped file no longer measures what its manifest entry recorded."""


class ManifestFileError(ValueError):
    """``manifest.json`` cannot be read, or an entry is not one ``write_manifest`` writes; the message names it."""


def read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """The entries recorded in ``path`` (none when there is no file yet), one object per model file."""
    if not path.is_file():
        return {}
    try:
        recorded = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
        raise ManifestFileError(f"cannot read {path}: {error}") from None
    if not isinstance(recorded, dict) or not all(isinstance(entry, dict) for entry in recorded.values()):
        raise ManifestFileError(f"{path} is not a manifest: one object per model file expected")
    return recorded


def recorded_slice(check: Any, n_test: int) -> tuple[int, int] | None:
    """The test images ``[start, stop)`` a recorded check was made on, None for an entry without one; ValueError for a
    check no version of this module writes (a metric by name, a number, a slice within the test split)."""
    if not check:
        return None
    if not isinstance(check, dict):
        raise ValueError("not an object")
    span, metric, value = check.get("test_slice"), check.get("metric"), check.get("value")
    if not (span and metric):
        return None
    pair = isinstance(span, list) and len(span) == 2 and all(type(i) is int for i in span)
    if not (pair and 0 <= span[0] < span[1] <= n_test):
        raise ValueError(f"test_slice must be [start, stop] within the {n_test} test images")
    if not isinstance(metric, str) or type(value) not in (int, float):
        raise ValueError("its metric must be a name and its value a number")
    return span[0], span[1]


def check_value(path: str | Path, test: Split) -> tuple[str, float]:
    """(metric, value) recorded for a model file: ``CHECK_METRIC`` of its kind, measured on ``test``."""
    kind, values = measure(path, test)
    return CHECK_METRIC[kind], values[CHECK_METRIC[kind]]


@torch.no_grad()
def measure(path: str | Path, test: Split) -> tuple[str, dict[str, float]]:
    """(kind, what the model file measures on ``test``): "mse" for a VAE; "nll" and "accuracy" for a classifier."""
    kind = checkpoints.load(path).get("kind")
    if kind == "vae":
        from semvae.evaluation.metrics import decode_images, latent_means, squared_errors

        vae, _ = checkpoints.load_vae(path)
        vae.to(memory_format=torch.channels_last)  # as the evaluation runs it: the same value, about 1.7x faster
        recon = decode_images(vae, latent_means(vae, test.images))
        return kind, {"mse": squared_errors(recon, test.images).mean().item()}
    if kind == "classifier":
        net, _ = checkpoints.load_classifier(path)
        net.to(memory_format=torch.channels_last)
        logits = net(test.images).float()
        return kind, {
            "nll": torch.nn.functional.cross_entropy(logits, test.labels).item(),
            "accuracy": (logits.argmax(1) == test.labels).float().mean().item(),
        }
    raise checkpoints.CheckpointError(f"{path}: unknown model kind {kind!r}")


def entry(path: Path, test: Split, digest: str) -> dict[str, Any]:
    """The manifest entry of the model file ``path`` whose SHA-256 is ``digest``, its check measured on ``test``."""
    state = checkpoints.load(path)
    metric, value = check_value(path, test)
    summary = state.get("summary", {})
    return {
        "sha256": digest,
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
        # a classifier's preset (conf/classifier/) and its accuracy on the whole test split when it was trained
        **(
            {"preset": state.get("classifier"), "test_accuracy": state["test/accuracy"]}
            if "test/accuracy" in state
            else {}
        ),
    }


def write_manifest(weights_dir: str | Path, data_root: str | Path) -> Path:
    """Write ``manifest.json`` for every ``*.pth`` below ``weights_dir``. New or changed files (another SHA-256) are
    measured now. A file whose SHA-256 is the one recorded keeps its entry; if its check was made on another slice or
    with another metric than now (``SLICE``, ``CHECK_METRIC``), the recorded value is first measured again as it was
    made (ManifestError if it no longer holds, and nothing is written), then the check is made anew."""
    weights_dir = Path(weights_dir)
    path = weights_dir / "manifest.json"
    recorded = read_manifest(path)
    split = load_split("mnist", data_root, train=False, download=False)
    test = split.subset(torch.arange(SLICE))
    manifest = {}
    for file in sorted(weights_dir.rglob("*.pth")):
        name = file.relative_to(weights_dir).as_posix()
        kept, digest = recorded.get(name), sha256(file)
        if kept is None or kept.get("sha256") != digest:
            manifest[name] = entry(file, test, digest)
            continue
        check = kept.get("check")
        try:
            span = recorded_slice(check, len(split))
        except ValueError as error:
            raise ManifestFileError(f"{path}: the check recorded for {name} is damaged: {error}") from None
        if span == (0, SLICE) and check.get("metric") == CHECK_METRIC.get(kept.get("kind")):
            manifest[name] = kept
            continue
        if span is not None:  # the old check must still hold before it is replaced
            then = measure(file, split.subset(torch.arange(*span)))[1].get(check["metric"])
            if then is None or abs(then - check["value"]) > 1e-5:
                raise ManifestError(
                    f"{file}: its recorded {check['metric']} on test images {check['test_slice']} was "
                    f"{check['value']}, now {then}: the model no longer measures what was recorded"
                )
        metric, value = check_value(file, test)
        manifest[name] = kept | {"check": {"metric": metric, "test_slice": [0, SLICE], "value": value}}
    checkpoints.write_text_atomic(json.dumps(manifest, indent=2) + "\n", path)
    return path


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 once the manifest is written; one line on stderr and 1 when a recorded check no longer
    holds or the file cannot be written, 2 when a model file, the manifest or the data cannot be read."""
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description="Write weights/manifest.json")
    parser.add_argument("--weights", default=str(root / "weights"))
    parser.add_argument("--data", default=os.environ.get("SEMVAE_DATA_DIR", str(root / "data")))
    args = parser.parse_args(argv)
    try:
        print(write_manifest(args.weights, args.data))
    except (ManifestError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (ManifestFileError, checkpoints.CheckpointError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
