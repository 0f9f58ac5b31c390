"""Checkpoint files: written atomically, read back with errors that name the file.

A training checkpoint (``last.pt``, ``best.pt`` in the run dir) holds the model, the optimiser, the epoch and
step, every random generator's state and the resolved config, so that a run can continue exactly. An exported
model (``weights/*.pth``) holds the model and the architecture, metrics and provenance needed to rebuild it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semvae.errors import InputError


class CheckpointError(InputError):
    """A checkpoint is missing, unreadable or does not fit the model; the message names the file."""


def write_atomic(data: bytes, path: str | Path) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename it over ``path``.

    A crash at any point leaves either the previous file or the new one, never a partial file; temporary files
    that an earlier, killed writer left beside ``path`` are removed first. The file gets the usual permissions
    (0666 less the umask). A failed write (a full disk, say) raises OSError naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(text: str, path: Path) -> None:
    write_atomic(text.encode(), path)


def write_json_atomic(obj: Any, path: Path, sort_keys: bool = True) -> None:
    write_text_atomic(json.dumps(obj, indent=2, sort_keys=sort_keys, default=str), path)


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` through ``write_atomic``.

    The object is serialised in memory first, so that an error of the file system (a full disk) is reported as
    such, and a signal during serialisation cannot leave torch's writer half done.
    """
    buffer = io.BytesIO()
    torch.save(_own_storage(obj), buffer)
    return write_atomic(buffer.getbuffer(), path)


def _own_storage(tree: Any) -> Any:
    """``tree`` with every tensor that views part of a larger storage copied out: torch.save writes a tensor's whole
    storage, and a member of a stack of runs holds its weights as one row of the stack's
    (``semvae/training/stacking.py``); its files must hold its own weights only, as a lone run's do."""
    if isinstance(tree, torch.Tensor):
        return tree.clone() if tree.untyped_storage().nbytes() > tree.numel() * tree.element_size() else tree
    if isinstance(tree, dict):
        copied = {k: _own_storage(v) for k, v in tree.items()}
        if all(copied[k] is v for k, v in tree.items()):
            return tree  # unchanged, with its type and attributes (a state dict's _metadata)
        return copied
    if isinstance(tree, list | tuple) and not hasattr(tree, "_fields"):
        copied = [_own_storage(v) for v in tree]
        return tree if all(a is b for a, b in zip(copied, tree, strict=True)) else type(tree)(copied)
    return tree


def export(obj: dict[str, Any], path: str | Path, overwrite: bool) -> Path:
    """Write a model file for others to load (e.g. ``weights/VAE_epoch50.pth``), never replacing one by accident."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} exists; pass task.overwrite=true to replace it")
    return save_atomic(obj, path)


def provenance(root: str | Path) -> dict[str, Any]:
    """The commit that made a file (with a flag for uncommitted changes), and when."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "HEAD") or None,
        "dirty": bool(git("status", "--porcelain", "-uno")),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint dict with ``torch.load(weights_only=True)``: tensors and plain values only, so that loading
    a file never runs code. A missing, truncated or corrupt file, or one holding other Python objects, raises
    CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    _check_format(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", str(error), re.IGNORECASE)
        if refused:
            raise CheckpointError(
                f"refused to load {path}: it holds a Python object ({refused.group(1)}) besides tensors and plain "
                "values, and loading it could run code; semvae files never need one"
            ) from None
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(error)}") from None
    except Exception as error:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}: {_first_line(error)}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a semvae checkpoint (no 'model' entry)")
    return state


# what a file torch.save wrote starts with: a zip archive (torch >= 1.6), or the pickled magic number of the legacy
# format (protocol 2, then 0x1950a86a20f9469cfc6c); anything else, a plain pickle say, is not a checkpoint
TORCH_FORMATS = (b"PK\x03\x04", b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19")


def _check_format(path: Path) -> None:
    """CheckpointError unless ``path`` starts as a torch.save file does; torch's own error for a plain pickle is
    "Unsupported operand 149", after a warning about pickle protocols."""
    try:
        with path.open("rb") as f:
            head = f.read(len(TORCH_FORMATS[1]))
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error.strerror or error}") from None
    if not head.startswith(TORCH_FORMATS):
        what = "empty" if not head else "not a file torch.save wrote (neither a zip archive nor torch's legacy format)"
        raise CheckpointError(f"cannot read checkpoint {path}: it is {what}")


def _first_line(error: BaseException) -> str:
    """torch's unpickling errors run over many lines of advice; the line that says what is wrong is kept."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(("Weights only load failed", "Please file", "Check the"))]
    return (specific or lines or [type(error).__name__])[0]


# what a training checkpoint (last.pt, best.pt) holds besides the model; model files (.pth) have none of it
TRAINING_STATE = ("optimizer", "epoch", "step", "rng")


def load_training_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint to continue training from; a model file (``weights/*.pth``) is refused with a message saying
    what ``trainer.resume`` takes."""
    state = load(path, map_location)
    if any(key not in state for key in TRAINING_STATE):
        raise CheckpointError(
            f"{path} is a model file, not a training checkpoint: it has no optimiser state or position to continue "
            "from. trainer.resume takes a run's last.pt or best.pt"
        )
    return state


def all_finite(*states: Any) -> bool:
    """Whether every floating-point tensor in the (nested) state dicts is finite; one host read for all of them."""
    tensors = [t for t in _tensors(states) if t.is_floating_point() and t.numel()]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _tensors(tree: Any):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from _tensors(value)


def load_weights(model: nn.Module, state: dict[str, Any], path: str | Path, expect: dict[str, Any]) -> nn.Module:
    """Load ``state['model']`` into ``model`` after checking the stored architecture against ``expect``.

    ``expect`` maps architecture keys (e.g. ``latent_dim``, ``widths``) to the configured values; a mismatch, or
    tensors of other shapes, raises CheckpointError naming the file and the differing keys.
    """
    stored = state.get("architecture", {})
    differing = {k: (stored[k], v) for k, v in expect.items() if k in stored and list_or_value(stored[k]) != v}
    if differing:
        details = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in differing.items())
        raise CheckpointError(f"{path} does not match the configured model ({details})")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit the configured model: {error}") from None
    return model


def list_or_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


def load_vae(path: str | Path, device: str | torch.device = "cpu", expect: dict[str, Any] | None = None):
    """A ResNetVAE rebuilt from a model file's stored architecture (checked against ``expect`` when given)."""
    from semvae.models import ResNetVAE

    state = load(path)
    arch = state.get("architecture")
    if state.get("kind") != "vae" or not arch:
        raise CheckpointError(f"{path} is not a VAE model file (kind={state.get('kind')!r})")
    model = ResNetVAE(arch["latent_dim"], arch["widths"], arch["blocks"])
    load_weights(model, state, path, expect or {})
    return model.to(device).eval(), state


def load_classifier(path: str | Path, device: str | torch.device = "cpu", expect: dict[str, Any] | None = None):
    """A frozen classifier rebuilt from a model file's stored architecture (checked against ``expect``); a file
    without ``arch`` holds a ResNet (``Classifier``), the only kind before other families were added."""
    from semvae.models import build_classifier, freeze

    state = load(path)
    arch = state.get("architecture")
    if state.get("kind") != "classifier" or not arch:
        raise CheckpointError(f"{path} is not a classifier model file (kind={state.get('kind')!r})")
    model = build_classifier(arch.get("arch", "resnet"), arch["widths"], arch.get("blocks", 1))
    load_weights(model, state, path, expect or {})
    return freeze(model.to(device)), state
