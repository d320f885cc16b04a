"""Data sets as one LightningDataModule: digits (default), MNIST-style, CIFAR, ImageNet folders, synthetic.

Every data set ends up as *train*, *val* and *test* splits of ``(image, label)`` pairs with images as float
tensors normalised by the data set's mean and std. Small data sets (digits, MNIST-style, CIFAR, fake) are
held in memory as ``uint8`` tensors and transformed per sample; ImageNet is read from an ``ImageFolder``.

Splits:

* digits (scikit-learn's 1,797 8x8 images, embedded in the package): a seeded 20 % test split, then a
  seeded ``val_fraction`` of the rest for validation;
* MNIST-style and CIFAR: the official test set, and a seeded ``val_fraction`` of the training set;
* ImageNet: ``train/`` for training, ``val/`` for validation and test;
* fake: independent seeded train / val / test draws of class-dependent patterns plus noise.

The split seed is separate from the training seed so that every run and every quantized variant evaluates
on the same images.
"""

from __future__ import annotations

import gzip
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    Sampler,
    SequentialSampler,
    Subset,
    default_collate,
)
from torchvision.transforms import v2

from lit_quant.app.config import DATASETS, DatasetInfo
from lit_quant.errors import LitQuantWarning, UserError
from lit_quant.safe_load import load_cifar_batch

#: Where Debian's ``dataset-fashion-mnist`` package puts the Fashion-MNIST files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


_MNIST_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
_CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


def dataset_info(name: str) -> DatasetInfo:
    """Facts about data set ``name``; :class:`UserError` for an unknown name."""
    if name not in DATASETS:
        raise UserError(f"unknown data set '{name}'; choose from {', '.join(DATASETS)}")
    return DATASETS[name]


class TensorImageDataset(Dataset):
    """In-memory images ``(N, C, H, W)`` uint8 with integer labels, transformed per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None) -> None:
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images of shape (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels, self.transform = images, labels.long(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        image = self.transform(image) if self.transform is not None else image.float() / 255.0
        return image, int(self.labels[index])


# ---------------------------------------------------------------------------------------------- raw loaders


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits: 1,797 images of 8x8 pixels valued 0..16, returned as uint8 0..255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    return images, torch.from_numpy(bunch.target).long()


def _find_idx_file(roots: Sequence[Path], stem: str) -> Path | None:
    for root in roots:
        for suffix in ("", ".gz"):
            path = root / f"{stem}{suffix}"
            if path.is_file():
                return path
    return None


def read_idx(path: Path) -> torch.Tensor:
    """Read a uint8 IDX file (LeCun's MNIST format), plain or gzip-compressed.

    Layout: two zero bytes, a type byte (``0x08`` = unsigned byte), a byte ``ndim``, then ``ndim``
    big-endian int32 sizes, then the data in C order.
    """
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError("not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"header says {dims} but the file holds {data.size} values (truncated?)")
    return torch.from_numpy(data.reshape(dims).copy())


def mnist_search_dirs(name: str, data_dir: Path) -> list[Path]:
    """Folders searched for MNIST-format files: ``data_dir``, torchvision's ``<data_dir>/<Folder>/raw``."""
    folder = _MNIST_FOLDERS[name]
    return [data_dir, data_dir / folder / "raw", data_dir / folder]


def load_mnist_tensors(name: str, data_dir: Path) -> dict[str, torch.Tensor]:
    """Read the four IDX files of MNIST or Fashion-MNIST (plain or ``.gz``, as torchvision or Debian store them).

    Raises:
        UserError: a file is missing or is not in IDX format.
    """
    roots = mnist_search_dirs(name, data_dir)
    out: dict[str, torch.Tensor] = {}
    for key, stem in _MNIST_FILES.items():
        path = _find_idx_file(roots, stem)
        if path is None:
            raise UserError(
                f"{name}: {stem}[.gz] not found in {data_dir} or {data_dir / _MNIST_FOLDERS[name] / 'raw'}; "
                f"expected {', '.join(_MNIST_FILES.values())} (pass --data-dir, or --download when online)")
        try:
            out[key] = read_idx(path).long() if "labels" in key else read_idx(path)
        except (ValueError, OSError, EOFError, zlib.error, struct.error) as exc:  # EOFError: truncated .gz
            raise UserError(f"{name}: cannot read {path} as an IDX file: {exc}") from exc
    for split in ("train", "test"):
        if len(out[f"{split}_images"]) != len(out[f"{split}_labels"]):
            raise UserError(f"{name}: {split} images and labels differ in count")
    return out


def load_cifar_tensors(name: str, data_dir: Path) -> dict[str, torch.Tensor]:
    """Read CIFAR-10/100 from the python pickle batches (``cifar-10-batches-py`` / ``cifar-100-python``).

    This is torchvision's on-disk format; the files are read directly (as torchvision's ``CIFAR10`` does)
    without its MD5 check, so that a subset in the same format also loads.
    """
    folder, train_files, test_files, label_key = _CIFAR_LAYOUT[name]
    base = data_dir / folder
    out: dict[str, torch.Tensor] = {}
    for split, files in (("train", train_files), ("test", test_files)):
        images, labels = [], []
        for file in files:
            path = base / file
            if not path.is_file():
                raise UserError(f"{name}: {path} not found; expected {folder}/ with "
                                f"{', '.join(train_files + test_files)} (pass --data-dir, or --download when online)")
            try:
                with open(path, "rb") as fh:
                    # a restricted unpickler: a batch that names any global but numpy's array rebuilders is refused
                    entry = load_cifar_batch(fh)
                images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(entry[label_key])
            except UserError:  # a refused global: its own line names the file already
                raise
            except Exception as exc:  # pickle and reshape raise assorted errors on bad files
                raise UserError(f"{name}: cannot read {path} as a CIFAR batch: {exc}") from exc
        out[f"{split}_images"] = torch.from_numpy(np.concatenate(images))
        out[f"{split}_labels"] = torch.tensor(labels, dtype=torch.long)
    return out


def make_fake_tensors(n: int, info: DatasetInfo, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic, learnable data: per-class smooth prototypes plus noise, as uint8 images.

    The prototypes come from a fixed generator (shared by all splits); labels and noise from ``seed``, so
    splits drawn with different seeds are independent samples of the same distribution.
    """
    proto_gen = torch.Generator().manual_seed(1234)
    low = torch.rand(info.num_classes, info.in_channels, 4, 4, generator=proto_gen)
    protos = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, info.num_classes, (n,), generator=gen)
    images = protos[labels] + 0.25 * torch.randn(n, info.in_channels, size, size, generator=gen)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


# ---------------------------------------------------------------------------------------------- transforms


def build_transforms(info: DatasetInfo, size: int, train: bool, augment: bool) -> v2.Compose:
    """Per-sample transforms for uint8 image tensors: resize, augmentation (train only), scale, normalise.

    Augmentation is the standard one for small images: a random crop with ``size / 8`` padding, plus
    horizontal flips where they preserve the label (not for digits).
    """
    steps: list[Callable] = []
    if size != info.native_size:
        steps.append(v2.Resize((size, size), antialias=True))
    if train and augment:
        steps.append(v2.RandomCrop(size, padding=max(1, size // 8)))
        if info.hflip:
            steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(info.mean, info.std)]
    return v2.Compose(steps)


def build_imagenet_transforms(info: DatasetInfo, size: int, train: bool, augment: bool) -> v2.Compose:
    """ImageNet: random-resized crop and flip for training; resize to ``size * 8/7`` and centre crop otherwise."""
    if train and augment:
        head: list[Callable] = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        head = [v2.Resize(int(round(size * 8 / 7)), antialias=True), v2.CenterCrop(size)]
    return v2.Compose([v2.PILToTensor(), *head, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(info.mean, info.std)])


# ---------------------------------------------------------------------------------------------- data module


def _seeded_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` into (rest, held-out) with ``round(n * fraction)`` held out, seeded."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = int(round(n * fraction))
    return sorted(perm[k:]), sorted(perm[:k])


class RankBatchSampler(BatchSampler):
    """One process's batches of ``sampler`` dealt out whole: rank ``rank`` of ``num_replicas`` gets batches
    ``rank, rank + num_replicas, rank + 2 num_replicas, ...``.

    The batch boundaries are one process's, so global batch ``b`` is the same tensor on any number of ranks:
    what bit-for-bit distributed calibration needs (see :class:`lit_quant.callbacks.PTQCalibration`). Ranks
    may get one batch more than others. A rank left without a batch (fewer batches than ranks) gets one empty
    batch, so that it still runs the calibration hooks whose merge every rank joins (observers ignore empty
    tensors); with no batches at all, no rank gets one.
    """

    def __init__(self, sampler: Sampler | list[int], batch_size: int, drop_last: bool = False, num_replicas: int = 1,
                 rank: int = 0) -> None:
        super().__init__(sampler, batch_size, drop_last)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in 0..{num_replicas - 1}, got {rank}")
        self.num_replicas, self.rank = num_replicas, rank

    def __iter__(self):  # type: ignore[override]
        batches = list(super().__iter__())
        mine = batches[self.rank::self.num_replicas]
        yield from (mine if mine or not batches else [[]])

    def __len__(self) -> int:
        total = super().__len__()
        return len(range(self.rank, total, self.num_replicas)) or min(total, 1)


def _cut_to_empty(batch: object) -> object:
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, (list, tuple)):
        return type(batch)(_cut_to_empty(b) for b in batch)
    return batch


class UnreadableImageWarning(LitQuantWarning):
    """An image file of a folder data set that could not be read, and was skipped."""


def _image_folder_class() -> type:
    """:class:`torchvision.datasets.ImageFolder` that skips the files PIL cannot read (imported on use)."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    class SkippingImageFolder(ImageFolder):
        """``ImageFolder`` whose unreadable files (truncated, not an image, a decompression bomb beyond PIL's
        pixel limit) are skipped: ``__getitem__`` returns None for them (the loaders' collate drops it), warns
        once with the path and the reason (:class:`UnreadableImageWarning`), and counts it in :attr:`skipped`,
        a shared-memory counter that data-loader workers add to as well.

        Why skip and count rather than refuse: a collection of a million images scraped or copied from
        elsewhere has a few bad files; checking every file's pixels before training would read the whole
        data set once more, and stopping a run hours in for one file loses the hours.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.skipped = torch.zeros(1, dtype=torch.int64).share_memory_()

        def __getitem__(self, index: int) -> Any:
            path, target = self.samples[index]
            try:
                sample = self.loader(path)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                self.skipped += 1
                warnings.warn(f"skipped unreadable image {path}: {exc}", UnreadableImageWarning, stacklevel=1)
                return None
            if self.transform is not None:
                sample = self.transform(sample)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return sample, target

    return SkippingImageFolder


def collate_readable(samples: list) -> object:
    """``default_collate`` of the samples a folder data set could read (unreadable ones are None); a batch
    none of whose files could be read stops the run (a folder of mostly bad files is not data to train on)."""
    readable = [s for s in samples if s is not None]
    if not readable:
        raise UserError(f"none of the {len(samples)} images of a batch could be read (each is named in a warning "
                        "above): check the data folder")
    return default_collate(readable)


class CollateOrEmpty:
    """``default_collate``; an empty batch (:class:`RankBatchSampler`'s stand-in) becomes ``dataset[0]``
    collated and cut to length 0: tensors of the right types and shapes, holding no sample."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __call__(self, samples: list) -> object:
        samples = [s for s in samples if s is not None]
        return default_collate(samples) if samples else _cut_to_empty(default_collate([self.dataset[0]]))


class ClassificationDataModule(pl.LightningDataModule):
    """One LightningDataModule for every supported data set.

    Args:
        name: data set name (``digits``, ``fashion-mnist``, ``mnist``, ``cifar10``, ``cifar100``,
            ``imagenet``, ``fake``).
        data_dir: where the files are (MNIST-style: the IDX files, or torchvision's ``<dir>/<Name>/raw``;
            CIFAR: the folder holding ``cifar-10-batches-py``; ImageNet: the folder with ``train/`` and
            ``val/``). Fashion-MNIST falls back to Debian's ``/usr/share/datasets/fashion-mnist``.
        image_size: side of the square images the model sees (default: the native size).
        batch_size: per-process batch size.
        num_workers: data-loader worker processes.
        val_fraction: share of the training data held out for validation.
        split_seed: seed of the train/val(/test) split.
        download: download through torchvision when files are missing (needs internet).
        augment: random crop / flip on the training split.
        fake_size: number of training images of the ``fake`` data set (val and test get a quarter each).
    """

    def __init__(self, name: str = "digits", data_dir: str | Path | None = None, image_size: int | None = None,
                 batch_size: int = 64, num_workers: int = 0, val_fraction: float = 0.1, split_seed: int = 0,
                 download: bool = False, augment: bool = True, fake_size: int = 512) -> None:
        super().__init__()
        self.info = dataset_info(name)
        if batch_size <= 0:
            raise UserError(f"batch size must be positive, got {batch_size}")
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"val fraction must be in (0, 1), got {val_fraction}")
        self.name = name
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.image_size = image_size or self.info.native_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.download, self.augment, self.fake_size = download, augment, fake_size
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.calib_set: Dataset | None = None  # the training split with evaluation transforms
        self.calib_batches = 32  # batches served by predict_dataloader (PTQ calibration)

    # --------------------------------------------------------------------------------------- locating data
    def resolved_data_dir(self) -> Path:
        """The folder files are read from: ``--data-dir``, Debian's Fashion-MNIST, or ``./data``."""
        if self.data_dir is not None:
            return self.data_dir
        if self.name == "fashion-mnist" and DEBIAN_FASHION_MNIST.is_dir() and not self.download:
            return DEBIAN_FASHION_MNIST
        return Path("data")

    def prepare_data(self) -> None:
        """Download through torchvision when ``download`` is set (rank 0 only, as Lightning calls it)."""
        if not self.download or self.name in ("digits", "fake", "imagenet"):
            return
        import torchvision.datasets as tvd

        root = str(self.resolved_data_dir())
        cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10,
               "cifar100": tvd.CIFAR100}[self.name]
        try:
            for train in (True, False):
                cls(root, train=train, download=True)
        except Exception as exc:  # network errors come in many types
            raise UserError(f"{self.name}: download to {root} failed: {exc}") from exc

    # --------------------------------------------------------------------------------------- building
    def setup(self, stage: str | None = None) -> None:
        """Load the data once and build the three splits (idempotent)."""
        if self.train_set is not None:
            return
        size = self.image_size
        if self.name == "imagenet":
            self._setup_imagenet(size)
            return
        train_tf = build_transforms(self.info, size, train=True, augment=self.augment)
        eval_tf = build_transforms(self.info, size, train=False, augment=False)
        if self.name == "fake":
            n, native = self.fake_size, self.info.native_size
            splits = [make_fake_tensors(n, self.info, native, seed=self.split_seed),
                      make_fake_tensors(max(1, n // 4), self.info, native, seed=self.split_seed + 1),
                      make_fake_tensors(max(1, n // 4), self.info, native, seed=self.split_seed + 2)]
            self.train_set, self.val_set, self.test_set = (
                TensorImageDataset(*split, transform=tf) for split, tf in zip(splits, (train_tf, eval_tf, eval_tf)))
            self.calib_set = TensorImageDataset(*splits[0], transform=eval_tf)
            self._check_splits(splits[0][1], splits[1][1], splits[2][1])
            return
        if self.name == "digits":
            images, labels = load_digits_tensors()
            rest, test_idx = _seeded_split(len(labels), 0.2, self.split_seed)
            train_images, train_labels = images[rest], labels[rest]
            test_images, test_labels = images[test_idx], labels[test_idx]
        else:
            loader = load_mnist_tensors if self.name in _MNIST_FOLDERS else load_cifar_tensors
            raw = loader(self.name, self.resolved_data_dir())
            train_images, train_labels = raw["train_images"], raw["train_labels"]
            test_images, test_labels = raw["test_images"], raw["test_labels"]
            if train_images.ndim == 3:
                train_images, test_images = train_images.unsqueeze(1), test_images.unsqueeze(1)
        train_idx, val_idx = _seeded_split(len(train_labels), self.val_fraction, self.split_seed + 1)
        train_images, train_labels, held_images, held_labels = (
            train_images[train_idx], train_labels[train_idx], train_images[val_idx], train_labels[val_idx])
        self._check_splits(train_labels, held_labels, test_labels)
        self.train_set = TensorImageDataset(train_images, train_labels, train_tf)
        self.calib_set = TensorImageDataset(train_images, train_labels, eval_tf)  # same tensors, no copy
        self.val_set = TensorImageDataset(held_images, held_labels, eval_tf)
        self.test_set = TensorImageDataset(test_images, test_labels, eval_tf)

    def _check_splits(self, train: torch.Tensor, val: torch.Tensor, test: torch.Tensor) -> None:
        """Refuse data that cannot train before any work: an empty split (a ``--val-fraction`` too small for
        the training set leaves validation, and so ``best.ckpt``, empty) or a label outside ``0..classes-1``
        (the loss would fail on it mid-epoch)."""
        where = f"{self.name} ({self.resolved_data_dir()})" if self.name not in ("digits", "fake") else self.name
        if len(train) == 0:
            raise UserError(f"{where}: the training set is empty")
        if len(val) == 0:
            total = len(train) + len(val)
            raise UserError(f"{where}: --val-fraction {self.val_fraction:g} of {total} training images leaves no "
                            f"validation images; use at least {1 / total:.2g}")
        if len(test) == 0:
            raise UserError(f"{where}: the test set is empty")
        classes = self.info.num_classes
        for split, labels in (("training", train), ("validation", val), ("test", test)):
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= classes:
                bad = lo if lo < 0 else hi
                raise UserError(f"{where}: {split} label {bad} is outside 0..{classes - 1} ({self.name} has "
                                f"{classes} classes)")

    def _setup_imagenet(self, size: int) -> None:
        image_folder = _image_folder_class()
        root = self.resolved_data_dir()
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise UserError(f"imagenet: {root / split} not found; expected class folders under "
                                f"{root}/train/ and {root}/val/ (pass --data-dir)")
        train = image_folder(str(root / "train"), build_imagenet_transforms(self.info, size, True, self.augment))
        val = image_folder(str(root / "val"), build_imagenet_transforms(self.info, size, False, False))
        if train.classes != val.classes:
            raise UserError(f"imagenet: train/ and val/ have different class folders under {root}")
        self.train_set, self.val_set, self.test_set = train, val, val
        self.calib_set = image_folder(str(root / "train"), build_imagenet_transforms(self.info, size, False, False))

    @property
    def num_classes(self) -> int:
        """Classes of the data set (ImageNet: the number of class folders once set up)."""
        if self.name == "imagenet" and isinstance(self.train_set, Dataset) and hasattr(self.train_set, "classes"):
            return len(self.train_set.classes)  # type: ignore[attr-defined]
        return self.info.num_classes

    # --------------------------------------------------------------------------------------- loaders
    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        assert dataset is not None, "call setup() first"
        sampler = None
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            # The Trainer runs with use_distributed_sampler=False so that evaluation is not padded: torch's
            # DistributedSampler repeats samples to even out ranks, which would count some images twice.
            sampler = (DistributedSampler(dataset, trainer.world_size, trainer.global_rank, shuffle=True,
                                          seed=self.split_seed) if train
                       else UnrepeatedDistributedSampler(dataset, trainer.world_size, trainer.global_rank,
                                                         shuffle=False))
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=train and sampler is None,
                          sampler=sampler, num_workers=self.num_workers, drop_last=False, collate_fn=collate_readable,
                          pin_memory=torch.cuda.is_available(), persistent_workers=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def _calib_subset(self) -> Subset:
        assert self.calib_set is not None, "call setup() first"
        n = min(len(self.calib_set), self.calib_batches * self.batch_size)  # type: ignore[arg-type]
        return Subset(self.calib_set, range(n))

    def predict_dataloader(self) -> DataLoader:
        """Calibration data: the first ``calib_batches * batch_size`` training images, evaluation transforms.

        Deterministic (no shuffling, no augmentation), so every variant of a comparison calibrates on the
        same images. Under DDP the batches of one process are dealt out whole (:class:`RankBatchSampler`):
        rank ``r`` of ``W`` gets batches ``r, r + W, ...``, the same tensors one process sees, so all ranks
        together see each image once, in the same batches, and calibrate bit for bit as one process.
        """
        subset = self._calib_subset()
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1:
            return self._loader(subset, train=False)
        batches = RankBatchSampler(SequentialSampler(subset), self.batch_size, drop_last=False,
                                   num_replicas=trainer.world_size, rank=trainer.global_rank)
        return DataLoader(subset, batch_sampler=batches, collate_fn=CollateOrEmpty(subset),
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=False)

    def full_calibration_dataloader(self) -> DataLoader:
        """The same calibration images, all of them in this process even under DDP: for calibrators that
        cannot merge statistics across ranks (torch.ao's observers), so every rank builds the same model."""
        return DataLoader(self._calib_subset(), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=collate_readable)

    def skipped_images(self) -> int:
        """Unreadable images the folder data sets skipped so far (0 for the others)."""
        sets = {id(d): d for d in (self.train_set, self.val_set, self.test_set, self.calib_set) if d is not None}
        return sum(int(d.skipped) for d in sets.values() if hasattr(d, "skipped"))
