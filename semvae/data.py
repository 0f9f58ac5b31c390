"""Datasets as tensors on the training device, and batches drawn by index.

The canonical IDX files under ``<root>/<MNIST|FashionMNIST>/raw`` (torchvision's layout) are read directly;
torchvision's classes fetch and checksum them where the internet is reachable and they are missing. After that the
whole split is a single float tensor in [0, 1] of shape (N, 1, 28, 28) on the device, and a training step only
indexes into it. No PIL, no per-sample transforms.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from semvae.errors import InputError

DATASETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


class DataError(InputError):
    """The dataset cannot be found or read; the message says where it looked and what to do."""


@dataclass
class Split:
    images: Tensor  # float32 in [0, 1], (N, 1, 28, 28)
    labels: Tensor  # int64, (N,)

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def subset(self, index: Tensor) -> Split:
        return Split(self.images[index], self.labels[index])


def _dataset_class(name: str):
    import torchvision.datasets as tvd

    return getattr(tvd, DATASETS[name])


# SHA-256 of the decompressed files of Debian's `dataset-fashion-mnist` (0.0~git20200523). Debian recompresses
# the .gz files, so their MD5 differ from the ones torchvision checks; the content is checked against these instead.
CONTENT_SHA256 = {
    "FashionMNIST": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    }
}


def _extract_from_mirror(cls, root: Path, mirror: Path) -> None:
    """Decompress the canonical .gz files from ``mirror`` into ``root/<Class>/raw``, where torchvision reads them.

    Each file must match torchvision's MD5 of the .gz, or the SHA-256 of its content recorded above; all four are
    checked before anything is written, so a bad mirror leaves ``root`` untouched.
    """
    from torchvision.datasets.utils import check_integrity

    contents = {}
    for resource, md5 in cls.resources:
        filename = resource.rsplit("/", 1)[-1]
        source = mirror / filename
        if not source.exists():
            raise DataError(f"data.mirror={str(mirror)!r} lacks {filename}")
        try:
            content = gzip.decompress(source.read_bytes())
        except (OSError, EOFError) as error:
            raise DataError(f"cannot decompress {source}: {error}") from None
        name = filename.removesuffix(".gz")
        known = CONTENT_SHA256.get(cls.__name__, {}).get(name)
        if not check_integrity(str(source), md5) and hashlib.sha256(content).hexdigest() != known:
            raise DataError(f"checksum mismatch: {source} matches neither torchvision's MD5 {md5} nor a known content")
        contents[name] = content
    raw = root / cls.__name__ / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, content in contents.items():
        tmp = raw / f".{name}.tmp"
        tmp.write_bytes(content)
        os.replace(tmp, raw / name)


def load_split(name: str, root: str | Path, train: bool, download: bool = True, mirror: str | None = None) -> Split:
    """Load one split (train or test) as float images in [0, 1] and int64 labels, on the CPU.

    The files under ``root/<Class>/raw`` are read directly (the IDX format is a header and an array); torchvision,
    which takes about as long to import as torch itself, is imported only to fetch a dataset that is not there."""
    if name not in DATASETS:
        raise DataError(f"data.name={name!r}: allowed values: {', '.join(DATASETS)}")
    root, folder = Path(root), DATASETS[name]
    raw = root / folder / "raw"
    prefix = "train" if train else "t10k"
    images, labels = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
    if images.is_file() and labels.is_file():
        return _as_split(read_idx(images, ndim=3), read_idx(labels, ndim=1), images, labels)
    check_raw_files(raw)  # a damaged file beside the missing one: say which
    if mirror is not None and Path(mirror).is_dir():
        _extract_from_mirror(_dataset_class(name), root, Path(mirror))
        return load_split(name, root, train, download=False)
    no_mirror = f"; data.mirror={mirror!r} is not a folder" if mirror is not None else ""
    if not download:
        missing = [p.name for p in (images, labels) if not p.is_file()]
        packed = [f"{m}.gz" for m in missing if (raw / f"{m}.gz").is_file()]
        raise DataError(
            f"{folder} not found under data.root={str(root)!r} ({raw} lacks {' and '.join(missing)}"
            + (f"; {' and '.join(packed)} there must be decompressed" if packed else "")
            + f"{no_mirror}) and data.download=false. Point data.root (or SEMVAE_DATA_DIR) at a folder holding "
            f"{folder}/raw/ (see README, 'Data')."
        )
    cls = _dataset_class(name)
    new = [p for p in (root, root / folder, raw) if not p.exists()]
    try:
        # torchvision checks the MD5 of what it fetches before extracting it into raw/, where it is read as above
        cls(str(root), train=train, download=True)
    except Exception as error:  # noqa: BLE001 - torchvision raises several types for network and checksum errors
        if new:  # the folders this attempt made, with whatever it left in them
            shutil.rmtree(new[0], ignore_errors=True)
        raise DataError(
            f"{folder} not found under data.root={str(root)!r} and could not be fetched ({fetch_failure(error)}"
            f"{no_mirror}); offline, point SEMVAE_DATA_DIR (or data.root) at a folder holding {folder}/raw/ by an "
            "absolute path, or set data.mirror to a folder of its canonical .gz files"
        ) from None
    return load_split(name, root, train, download=False)


N_CLASSES = 10  # MNIST digits, Fashion-MNIST garment classes


def fetch_failure(error: BaseException) -> str:
    """torchvision's download error in one line: the last reason it gives (``Name or service not known``), not
    its list of every mirror tried."""
    reasons = re.findall(r"<urlopen error (.*?)>", str(error)) or [line for line in str(error).splitlines() if line]
    reason = re.sub(r"^\[Errno -?\d+\]\s*", "", reasons[-1].strip()) if reasons else type(error).__name__
    return f"download failed: {reason}"


def read_idx(path: Path, ndim: int) -> Tensor:
    """The uint8 array of an IDX file (MNIST's format: 2 zero bytes, the item type 0x08, the number of dimensions,
    each dimension as a big-endian int32, then the items), as torchvision's MNIST reads it. A file whose header
    or size does not fit gets a DataError naming it."""
    data = path.read_bytes()
    _check_idx(path, data)
    if data[2] != 0x08 or data[3] != ndim:
        raise DataError(
            f"{path} holds {data[3]}-dimensional items of type {data[2]:#04x}, not {ndim}-dimensional uint8"
        )
    shape = [int.from_bytes(data[4 + 4 * d : 8 + 4 * d], "big") for d in range(ndim)]
    if math.prod(shape) == 0:  # torch.frombuffer refuses an empty buffer
        return torch.empty(shape, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=4 + 4 * ndim).view(*shape)


IMAGE_SIZE = (28, 28)  # of MNIST and Fashion-MNIST; the models' three resolutions (28, 14, 7) assume it


def _as_split(data: Tensor, targets: Tensor, images_file: Path, labels_file: Path) -> Split:
    if len(data) == 0:
        raise DataError(f"{images_file} holds no images; replace it (README, 'Data')")
    if tuple(data.shape[1:]) != IMAGE_SIZE:
        raise DataError(
            f"{images_file} holds {data.shape[1]}x{data.shape[2]}-pixel images where {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} "
            "are expected; replace it (README, 'Data')"
        )
    if len(data) != len(targets):
        raise DataError(
            f"{labels_file} holds {len(targets)} labels for {len(data)} images in {images_file}: the two files must "
            "come from the same split (README, 'Data')"
        )
    labels = targets.long()
    bad = ((labels < 0) | (labels >= N_CLASSES)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"{labels_file.parents[1].name} labels must be in 0..{N_CLASSES - 1}; label {int(labels[i])} at index "
            f"{i} ({len(bad)} such labels) in {labels_file}"
        )
    return Split(data.unsqueeze(1).float().div_(255.0), labels)


def check_raw_files(raw: Path) -> None:
    """DataError naming the first file under ``raw`` whose size differs from what its IDX header announces
    (a truncated copy, say)."""
    if not raw.is_dir():
        return
    for path in sorted(raw.iterdir()):
        if not path.suffix and path.is_file():  # not the .gz downloads or temporary files
            _check_idx(path, path.read_bytes())


def _check_idx(path: Path, data: bytes) -> None:
    """IDX: 2 zero bytes, the item type, the number of dimensions, each dimension (big-endian int32), the items."""
    if data[:2] == b"\x1f\x8b":
        raise DataError(f"{path} is gzip-compressed: decompress it in place (gunzip -c FILE.gz > FILE)")
    if len(data) >= 2 and data[:2] != b"\x00\x00":
        raise DataError(
            f"{path} is not an IDX file (it does not start with two zero bytes); replace it (README, 'Data')"
        )
    if len(data) < 4 or len(data) < 4 + 4 * data[3]:
        raise DataError(f"{path} is damaged: {len(data)} bytes, too short for an IDX header")
    ndim, item_size = data[3], {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}.get(data[2], 1)
    dims = [int.from_bytes(data[4 + 4 * d : 8 + 4 * d], "big") for d in range(ndim)]
    expected = 4 + 4 * ndim + item_size * math.prod(dims)
    if len(data) != expected:
        # 255 large dimensions announce a number of thousands of digits: its order of magnitude says enough
        digits = int((expected.bit_length() - 1) * math.log10(2))
        announced = f"{expected}" if expected < 10**15 else f"over 10^{digits}"
        raise DataError(
            f"{path} is damaged: {len(data)} bytes where its header announces {announced}; replace it (README, 'Data')"
        )


def train_val_split(split: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """Carve a validation split from ``split`` with a fixed seed (the same for every run)."""
    if not 1 <= val_size < len(split):
        raise DataError(f"data.val_size={val_size}: must be in [1, {len(split) - 1}] for {len(split)} images")
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    return split.subset(order[val_size:]), split.subset(order[:val_size])


def batch_indices(
    n: int, batch_size: int, generator: torch.Generator | None, device: torch.device | str, drop_last: bool
) -> Iterator[Tensor]:
    """Index tensors on ``device``: shuffled with ``generator`` (a CPU generator) or in order when it is None.

    The permutation is drawn on the CPU and moved once per epoch, so batches are the same on every device.
    """
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    order = order.to(device, non_blocking=True)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


def random_shift(x: Tensor, max_shift: int) -> Tensor:
    """Translate each image of (B, C, H, W) by its own random offset in [-max_shift, max_shift]^2, zero-filled.

    One gather for the whole batch, offsets drawn on the device (no host sync).
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b, 1), device=x.device)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]
