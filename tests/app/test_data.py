"""Data modules: embedded digits, and MNIST / CIFAR / ImageFolder loaders on files written in their real formats."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

from lit_quant.app.data import ClassificationDataModule, read_idx
from lit_quant.errors import UserError


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """Write ``array`` (uint8) in LeCun's IDX format: magic 0x0000080N, big-endian sizes, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)


def write_mnist(root: Path, n_train: int = 40, n_test: int = 20, compress: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8)}
    for stem, array in arrays.items():
        write_idx(root / (stem + (".gz" if compress else "")), array, compress)
    return arrays


def write_cifar(root: Path, hundred: bool = False, per_batch: int = 12) -> tuple[np.ndarray, list[int]]:
    """Write CIFAR python batches: pickled dicts with 'data' (N, 3072) uint8 rows (R, G, B planes) and labels."""
    rng = np.random.default_rng(1)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    files = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    all_train, train_labels = [], []
    for name in files:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 100 if hundred else 10, per_batch).tolist()
        entry = {"data": data, ("fine_labels" if hundred else "labels"): labels, "filenames": ["x.png"] * per_batch}
        if hundred:
            entry["coarse_labels"] = [lab // 5 for lab in labels]
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh)
        if "test" not in name:
            all_train.append(data)
            train_labels += labels
    meta = {"fine_label_names": ["c"] * 100, "coarse_label_names": ["c"] * 20} if hundred else \
        {"label_names": ["c"] * 10, "num_cases_per_batch": per_batch}
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as fh:
        pickle.dump(meta, fh)
    return np.concatenate(all_train), train_labels


def test_idx_reader_matches_torchvision(tmp_path: Path) -> None:
    arrays = write_mnist(tmp_path / "MNIST" / "raw")
    from torchvision.datasets.mnist import read_image_file, read_label_file

    ours = read_idx(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte")
    assert torch.equal(ours, read_image_file(str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte")))
    assert torch.equal(read_idx(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte").long(),
                       read_label_file(str(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte")))
    assert np.array_equal(ours.numpy(), arrays["train-images-idx3-ubyte"])


@pytest.mark.parametrize("name,layout,compress", [
    ("mnist", "torchvision", False), ("fashion-mnist", "torchvision", False), ("fashion-mnist", "debian", True),
])
def test_mnist_family_loads_real_format(tmp_path: Path, name: str, layout: str, compress: bool) -> None:
    folder = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name]
    where = tmp_path / folder / "raw" if layout == "torchvision" else tmp_path
    arrays = write_mnist(where, compress=compress)
    dm = ClassificationDataModule(name, data_dir=tmp_path, val_fraction=0.25, batch_size=8)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (30, 10, 20)
    assert torch.equal(dm.test_set.images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    # train + val is the whole training file, each image once
    seen = torch.cat([dm.train_set.images, dm.val_set.images]).flatten(1)
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"]).flatten(1)
    assert sorted(map(bytes, seen.numpy())) == sorted(map(bytes, expected.numpy()))


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_loads_real_format_like_torchvision(tmp_path: Path, hundred: bool, monkeypatch) -> None:
    write_cifar(tmp_path, hundred)
    name = "cifar100" if hundred else "cifar10"
    dm = ClassificationDataModule(name, data_dir=tmp_path, val_fraction=0.2, batch_size=4)
    dm.setup()
    n_train = 12 if hundred else 60
    assert len(dm.train_set) + len(dm.val_set) == n_train and len(dm.test_set) == 12
    # torchvision's own loader reads the same files to the same pixels (its MD5 check skipped for the fixture)
    cls = torchvision.datasets.CIFAR100 if hundred else torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    tv = cls(str(tmp_path), train=False, download=False)
    assert np.array_equal(dm.test_set.images.permute(0, 2, 3, 1).numpy(), tv.data)
    assert dm.test_set.labels.tolist() == list(tv.targets)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)


def test_imagenet_folders(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for cls in ("n01", "n02", "n03"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    dm = ClassificationDataModule("imagenet", data_dir=tmp_path, image_size=32, batch_size=3)
    dm.setup()
    assert dm.num_classes == 3 and len(dm.train_set) == 6 and len(dm.val_set) == 6
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [0, 0, 1]


def test_digits_split_is_seeded_and_disjoint() -> None:
    a, b = ClassificationDataModule("digits"), ClassificationDataModule("digits")
    a.setup()
    b.setup()
    assert (len(a.train_set), len(a.val_set), len(a.test_set)) == (1294, 144, 359)
    assert torch.equal(a.val_set.images, b.val_set.images)
    flat = lambda ds: {bytes(img.numpy()) + bytes([int(lab)]) for img, lab in zip(ds.images, ds.labels)}
    # digits has a few duplicate images, so compare sizes of the union instead of exact disjointness
    assert len(flat(a.train_set) | flat(a.val_set) | flat(a.test_set)) >= 1780
    c = ClassificationDataModule("digits", split_seed=1)
    c.setup()
    assert not torch.equal(a.test_set.images, c.test_set.images)


def test_missing_files_name_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="train-images-idx3-ubyte.*--download"):
        ClassificationDataModule("mnist", data_dir=tmp_path).setup()
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        ClassificationDataModule("cifar10", data_dir=tmp_path).setup()
    with pytest.raises(UserError, match="train/"):
        ClassificationDataModule("imagenet", data_dir=tmp_path).setup()
    with pytest.raises(UserError, match="unknown data set 'svhn'"):
        ClassificationDataModule("svhn")


def test_truncated_idx_file_is_a_clear_error(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError, match="cannot read .*train-images-idx3-ubyte.*truncated"):
        ClassificationDataModule("mnist", data_dir=tmp_path).setup()


def test_unpadded_sampler_covers_each_index_once() -> None:
    data = list(range(10))
    parts = [list(UnrepeatedDistributedSampler(data, 3, r, shuffle=False)) for r in range(3)]
    assert sorted(sum(parts, [])) == data
    assert [len(p) for p in parts] == [len(s) for s in (UnrepeatedDistributedSampler(data, 3, r, shuffle=False) for r in range(3))]


def test_fake_data_is_learnable_signal() -> None:
    dm = ClassificationDataModule("fake", fake_size=256, image_size=8)
    dm.setup()
    x, y = dm.train_set.images.float().flatten(1), dm.train_set.labels
    # nearest class mean classifies well above chance: the classes carry signal
    means = torch.stack([x[y == k].mean(0) for k in range(10)])
    xt, yt = dm.test_set.images.float().flatten(1), dm.test_set.labels
    acc = (torch.cdist(xt, means).argmin(1) == yt).float().mean().item()
    assert acc > 0.5


def test_debian_fashion_mnist_full_files() -> None:
    """The benchmark set from Debian's dataset-fashion-mnist (installed by .ci/run), found without --data-dir."""
    from lit_quant.app.data import DEBIAN_FASHION_MNIST

    assert DEBIAN_FASHION_MNIST.is_dir(), "apt-get install dataset-fashion-mnist"
    dm = ClassificationDataModule("fashion-mnist")
    assert dm.resolved_data_dir() == DEBIAN_FASHION_MNIST
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (54000, 6000, 10000)
    assert dm.test_set.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(dm.test_set.labels).tolist() == [1000] * 10
