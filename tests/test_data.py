import gzip
import re
import sys
from pathlib import Path

import pytest
import torch

from semvae.data import DataError, batch_indices, load_split, random_shift, train_val_split
from tests.conftest import need_mnist


def test_prestaged_mnist_loads_as_float_tensors():
    train = load_split("mnist", need_mnist(), train=True, download=False)
    test = load_split("mnist", need_mnist(), train=False, download=False)
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.float32
    assert len(test) == 10_000 and len(train) >= 23_797  # 60,000 where the full set was downloaded
    assert 0.0 == train.images.min().item() and train.images.max().item() == 1.0
    assert set(train.labels.unique().tolist()) == set(range(10))


def test_the_idx_files_read_without_torchvision_as_torchvision_reads_them(monkeypatch):
    from torchvision.datasets import MNIST

    reference = MNIST(str(need_mnist()), train=False, download=False)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # any import of torchvision now fails
    test = load_split("mnist", need_mnist(), train=False, download=False)
    assert torch.equal(test.images, reference.data.unsqueeze(1).float() / 255)
    assert torch.equal(test.labels, reference.targets)


def test_an_idx_file_of_another_shape_is_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    labels = (need_mnist() / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes()
    (raw / "t10k-images-idx3-ubyte").write_bytes(labels)  # a labels file where the images belong
    (raw / "t10k-labels-idx1-ubyte").write_bytes(labels)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte holds 1-dimensional items of type 0x08, not 3-"):
        load_split("mnist", tmp_path, train=False, download=False)


def _idx(path: Path, dims: list[int], items: bytes = b"") -> Path:
    """An IDX file of uint8 items: its header announces ``dims``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + items)
    return path


@pytest.mark.parametrize(("n", "size", "expected"), [(0, 28, "holds no images"), (3, 2, "holds 2x2-pixel images")])
def test_an_idx_file_of_no_images_or_of_small_images_is_named(tmp_path, n, size, expected):
    raw = tmp_path / "MNIST" / "raw"
    images = _idx(raw / "t10k-images-idx3-ubyte", [n, size, size], bytes(n * size * size))
    _idx(raw / "t10k-labels-idx1-ubyte", [n], bytes(n))
    with pytest.raises(DataError, match=re.escape(f"{images} {expected}")):
        load_split("mnist", tmp_path, train=False, download=False)


def test_an_idx_header_of_255_huge_dimensions_is_named_in_a_short_line(tmp_path):
    """The size such a header announces has over 2,000 digits; the message gives its order of magnitude."""
    raw = tmp_path / "MNIST" / "raw"
    images = _idx(raw / "t10k-images-idx3-ubyte", [2**31 - 1] * 255)
    _idx(raw / "t10k-labels-idx1-ubyte", [1], bytes(1))
    with pytest.raises(DataError) as refused:
        load_split("mnist", tmp_path, train=False, download=False)
    message = str(refused.value)
    assert message.startswith(f"{images} is damaged: 1024 bytes where its header announces over 10^2379;")


def test_validation_split_is_fixed_by_its_seed_and_disjoint():
    full = load_split("mnist", need_mnist(), train=True, download=False)
    tr1, va1 = train_val_split(full, 2000, seed=0)
    tr2, va2 = train_val_split(full, 2000, seed=0)
    _, va3 = train_val_split(full, 2000, seed=1)
    assert len(va1) == 2000 and len(tr1) == len(full) - 2000
    assert torch.equal(va1.images, va2.images) and torch.equal(tr1.labels, tr2.labels)
    assert not torch.equal(va1.images, va3.images)
    flat_train = {bytes(x.numpy()) for x in (tr1.images[:500] * 255).to(torch.uint8)}
    assert not any(bytes(x.numpy()) in flat_train for x in (va1.images * 255).to(torch.uint8))


def test_missing_dataset_offline_gives_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"MNIST not found under data.root=.*SEMVAE_DATA_DIR"):
        load_split("mnist", tmp_path, train=True, download=False)
    with pytest.raises(DataError, match="allowed values: mnist, fashion_mnist"):
        load_split("cifar", tmp_path, train=True)


def test_batches_cover_every_index_once_and_follow_the_seed():
    batches = list(batch_indices(103, 10, torch.Generator().manual_seed(0), "cpu", drop_last=True))
    assert len(batches) == 10 and all(b.numel() == 10 for b in batches)
    assert torch.cat(batches).unique().numel() == 100
    again = list(batch_indices(103, 10, torch.Generator().manual_seed(0), "cpu", drop_last=True))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    ordered = torch.cat(list(batch_indices(103, 10, None, "cpu", drop_last=False)))
    assert torch.equal(ordered, torch.arange(103))


def test_random_shift_moves_each_image_within_the_bound():
    x = torch.zeros(64, 1, 28, 28)
    x[:, 0, 14, 14] = 1.0  # one lit pixel in the centre
    torch.manual_seed(0)
    shifted = random_shift(x, 2)
    assert shifted.shape == x.shape
    assert torch.all(shifted.sum(dim=(1, 2, 3)) == 1.0)  # the pixel is moved, not lost
    where = shifted[:, 0].flatten(1).argmax(1)
    rows, cols = where // 28, where % 28
    assert rows.min() >= 12 and rows.max() <= 16 and cols.min() >= 12 and cols.max() <= 16
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 10  # offsets differ between images


FASHION_MIRROR = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION_MIRROR.is_dir(), reason="needs Debian's dataset-fashion-mnist (see README, 'Data')")
def test_fashion_mnist_from_the_debian_mirror(tmp_path):
    test = load_split("fashion_mnist", tmp_path, train=False, download=True, mirror=str(FASHION_MIRROR))
    assert len(test) == 10_000 and test.images.shape[1:] == (1, 28, 28)
    assert (tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()
    # a second load reads the extracted files without the mirror
    again = load_split("fashion_mnist", tmp_path, train=False, download=False)
    assert torch.equal(again.labels, test.labels)


def test_mirror_with_a_wrong_checksum_is_refused(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (mirror / f"{name}.gz").write_bytes(gzip.compress(b"not the real file"))
    with pytest.raises(DataError, match="checksum mismatch: .*train-images-idx3-ubyte.gz"):
        load_split("fashion_mnist", tmp_path / "root", train=True, download=True, mirror=str(mirror))
    assert not (tmp_path / "root" / "FashionMNIST").exists()  # nothing half-copied


def test_a_mirror_that_is_not_a_folder_is_named_when_the_data_is_missing(tmp_path):
    """Fashion-MNIST's default mirror is Debian's folder; without the package the error says so, not only that the
    files are missing."""
    absent = tmp_path / "no-such-mirror"
    with pytest.raises(DataError, match=re.escape(f"data.mirror='{absent}' is not a folder) and data.download=false")):
        load_split("fashion_mnist", tmp_path / "root", train=False, download=False, mirror=str(absent))
    assert not (tmp_path / "root").exists()


@pytest.fixture
def offline(monkeypatch):
    """The network stubbed at its boundary (urllib's urlopen, which torchvision's fetch calls): every request fails
    as it does offline, through torchvision's own mirror loop and error handling. Returns the URLs requested."""
    import urllib.error
    import urllib.request

    requested = []

    def unreachable(request, *args, **kwargs):
        requested.append(request.full_url)
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    return requested


def test_a_failed_download_names_the_error_and_the_ways_offline_and_removes_what_it_made(tmp_path, offline):
    from torchvision.datasets import MNIST

    absent = tmp_path / "no-such-mirror"
    with pytest.raises(DataError) as refused:
        load_split("mnist", tmp_path / "root", train=False, download=True, mirror=str(absent))
    message = str(refused.value)
    assert sorted(url.rsplit("/", 1)[0] + "/" for url in offline) == sorted(MNIST.mirrors)  # each mirror once
    assert f"MNIST not found under data.root='{tmp_path / 'root'}' and could not be fetched (" in message
    assert "(download failed: network unreachable;" in message and "\n" not in message  # one line, the reason once
    assert f"; data.mirror='{absent}' is not a folder)" in message
    assert "set data.mirror to a folder of its canonical .gz files" in message
    assert not (tmp_path / "root").exists()  # the folders the attempt made are removed


def test_a_failed_download_keeps_a_data_root_that_was_there(tmp_path, offline):
    root = tmp_path / "root"
    root.mkdir()
    (root / "notes.txt").write_text("a user's file")
    with pytest.raises(DataError, match="could not be fetched"):
        load_split("mnist", root, train=True, download=True)
    assert offline and [p.name for p in root.iterdir()] == ["notes.txt"]  # only the MNIST folder it made is removed
