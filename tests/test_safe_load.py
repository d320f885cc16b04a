"""No code runs from a checkpoint or a CIFAR batch: a pickled object whose ``__reduce__`` calls ``open`` (to
create a marker file) is planted in real files of a tiny run, and every entry point that reads such a file
refuses it with one line and exit code 2, before calling anything the file names."""

from __future__ import annotations

import io
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script, tiny_args
from test_data import write_cifar
from torch.utils.data import DataLoader, TensorDataset

import quantize
import train
from lit_quant.app.data import ClassificationDataModule
from lit_quant.errors import UserError
from lit_quant.app.pipeline.checkpoint import load_quantized
from lit_quant.safe_load import load_checkpoint, load_cifar_batch
from lit_quant.app.training import AtomicCheckpointIO, load_classifier

pytestmark = pytest.mark.slow

REFUSAL = "holds code or Python objects lit-quant does not load (GLOBAL io.open): refused, nothing in it was run"


class Payload:
    """Unpickles as ``open(marker, "w")``: the file appearing is proof that a load ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return open, (str(self.marker), "w")


def plant(src: Path, dst: Path, marker: Path) -> Path:
    """Copy checkpoint ``src`` to ``dst`` with one extra key holding a :class:`Payload`."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)  # our own file, written by the fixture
    ckpt["extra"] = Payload(marker)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dst)
    return dst


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny fp32 run ``tiny`` (best.ckpt, last.ckpt), quantized with one QAT epoch: ptq-w8a8.ckpt,
    qat-w8a8.ckpt and qat-w8a8/last.ckpt. Returns the run folder."""
    root = tmp_path_factory.mktemp("safe") / "checkpoints"
    assert train.main(tiny_args(root, "--run-name", "tiny", "--epochs", "1")) == 0
    assert quantize.main(["--checkpoint-dir", str(root), "--mode", "qat", "--epochs", "1", "--no-builtin-qat",
                          "--calib-batches", "1", "--no-latency", "--no-progress"]) == 0
    return root / "tiny"


def test_payload_is_live(run: Path, tmp_path: Path) -> None:
    """The planted file really runs its payload under an unrestricted load, so the refusals below mean
    something."""
    marker = tmp_path / "ran"
    poisoned = plant(run / "best.ckpt", tmp_path / "p.ckpt", marker)
    torch.load(poisoned, weights_only=False)
    assert marker.exists()


def test_genuine_files_load(run: Path) -> None:
    """Every checkpoint lit-quant writes loads weights-only with no extra allowed global."""
    for name in ("best.ckpt", "last.ckpt", "ptq-w8a8.ckpt", "qat-w8a8.ckpt", "qat-w8a8/last.ckpt"):
        assert "state_dict" in load_checkpoint(run / name)
    assert "state_dict" in AtomicCheckpointIO().load_checkpoint(run / "qat-w8a8" / "last.ckpt")
    _, payload = load_quantized(run / "ptq-w8a8.ckpt")
    assert payload["lit_quant"] == "ptq"


def _poisoned_cifar(root: Path, marker: Path) -> Path:
    """CIFAR-10 batches in their on-disk layout under ``root``, ``data_batch_1`` carrying a :class:`Payload`."""
    write_cifar(root)
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    with open(batch, "rb") as fh:
        entry = pickle.load(fh)  # our own file, just written
    entry["extra"] = Payload(marker)
    with open(batch, "wb") as fh:
        pickle.dump(entry, fh, protocol=2)  # the original files' protocol
    return root


def _entry_point(case: str, run: Path, tmp: Path, marker: Path) -> tuple[str, list[str]]:
    """(script, arguments) of entry point ``case``, reading a poisoned file as a user would pass it."""
    out = ["--checkpoint-dir", str(tmp / "out")]
    quant = ["--no-latency", "--no-progress", "--calib-batches", "1"]
    if case == "train-resume-file":
        best = plant(run / "best.ckpt", tmp / "given" / "best.ckpt", marker)
        return "train.py", tiny_args(tmp / "out", "--resume", str(best), "--epochs", "1")
    if case == "train-resume-last":  # the newest */last.ckpt under --checkpoint-dir
        plant(run / "last.ckpt", tmp / "root" / "tiny" / "last.ckpt", marker)
        return "train.py", tiny_args(tmp / "root", "--resume", "last", "--epochs", "2")
    if case == "quantize-ckpt":
        best = plant(run / "best.ckpt", tmp / "given" / "best.ckpt", marker)
        return "quantize.py", ["--ckpt", str(best), *quant]
    if case == "quantize-default-best":  # the newest */best.ckpt under --checkpoint-dir
        plant(run / "best.ckpt", tmp / "root" / "tiny" / "best.ckpt", marker)
        return "quantize.py", ["--checkpoint-dir", str(tmp / "root"), *quant]
    if case == "quantize-qat-resume":  # a genuine fp32 run whose QAT last.ckpt is poisoned
        (tmp / "root" / "tiny").mkdir(parents=True)
        shutil.copy(run / "best.ckpt", tmp / "root" / "tiny" / "best.ckpt")
        plant(run / "qat-w8a8" / "last.ckpt", tmp / "root" / "tiny" / "qat-w8a8" / "last.ckpt", marker)
        return "quantize.py", ["--checkpoint-dir", str(tmp / "root"), "--mode", "qat", "--resume", "last",
                               "--epochs", "1", "--no-builtin-qat", *quant]
    if case == "quantize-eval":
        ptq = plant(run / "ptq-w8a8.ckpt", tmp / "given" / "ptq-w8a8.ckpt", marker)
        return "quantize.py", ["--eval", str(ptq), *out]
    raise AssertionError(f"unknown entry point {case}")


def _assert_refused(script: str, args: list[str], marker: Path) -> None:
    """Run ``script args``: exit code 2, one stderr line saying it refuses the object, no marker file."""
    proc = run_script(script, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and REFUSAL in lines[0], proc.stderr[-2000:]
    assert not marker.exists()


@pytest.mark.parametrize("case", ["train-resume-file", "train-resume-last", "quantize-ckpt", "quantize-default-best",
                                  "quantize-qat-resume", "quantize-eval"])
def test_entry_point_refuses_planted_object(run: Path, tmp_path: Path, case: str) -> None:
    marker = tmp_path / "ran"
    _assert_refused(*_entry_point(case, run, tmp_path, marker), marker)


def test_train_refuses_planted_object_in_cifar_batch(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    data_dir = _poisoned_cifar(tmp_path / "data", marker)
    _assert_refused("train.py", ["--data", "cifar10", "--data-dir", str(data_dir), "--epochs", "1", "--no-progress",
                                 "--checkpoint-dir", str(tmp_path / "out")], marker)


def test_lightning_loads_go_through_the_safe_loader(run: Path, tmp_path: Path) -> None:
    """``trainer.test(ckpt_path=...)`` reads the file with AtomicCheckpointIO's weights-only load."""
    import pytorch_lightning as pl

    marker = tmp_path / "ran"
    poisoned = plant(run / "last.ckpt", tmp_path / "last.ckpt", marker)
    trainer = pl.Trainer(accelerator="cpu", plugins=[AtomicCheckpointIO()], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    data = DataLoader(TensorDataset(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)), batch_size=2)
    with pytest.raises(UserError, match=re.escape(f"checkpoint {poisoned} {REFUSAL}")):
        trainer.test(load_classifier(run / "best.ckpt"), dataloaders=data, ckpt_path=str(poisoned), verbose=False)
    assert not marker.exists()


def test_damaged_checkpoints_keep_their_messages(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x80\x04not a checkpoint at all")
    with pytest.raises(UserError, match=r"^cannot read checkpoint .*garbage.ckpt: UnpicklingError: Unsupported"):
        load_checkpoint(garbage)
    with pytest.raises(UserError, match="^cannot read quantized checkpoint .*garbage.ckpt"):
        load_quantized(garbage)
    with pytest.raises(UserError, match="^quantized checkpoint .* not found"):
        load_quantized(tmp_path / "none.ckpt")


def _batch(rows: int = 3) -> dict:
    rng = np.random.default_rng(0)
    return {"batch_label": "training batch 1 of 5", "labels": [1, 2, 3][:rows],
            "data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8), "filenames": ["a.png"] * rows}


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_cifar_batch_loads_every_protocol(protocol: int) -> None:
    entry = _batch()
    blob = pickle.dumps(entry, protocol=protocol)
    variants = [blob]
    if protocol <= 2:  # numpy 1's module name, as in the original files (protocol 4 frames fix the lengths)
        variants.append(blob.replace(b"numpy._core.", b"numpy.core."))
    for data in variants:
        got = load_cifar_batch(io.BytesIO(data))
        assert np.array_equal(got["data"], entry["data"]) and got["data"].dtype == np.uint8
        assert got["labels"] == entry["labels"] and got["batch_label"] == entry["batch_label"]


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_cifar_batch_refuses_other_globals(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(_batch() | {"extra": Payload(marker)}, protocol=protocol))
    with pytest.raises(UserError, match=f"^CIFAR batch {path} {re.escape(REFUSAL)}$"):
        load_cifar_batch(path)
    assert not marker.exists()


def test_damaged_cifar_batch_keeps_its_message(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(UserError, match="cannot read .*data_batch_2 as a CIFAR batch"):
        ClassificationDataModule("cifar10", data_dir=tmp_path).setup()
