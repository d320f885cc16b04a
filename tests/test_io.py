"""Atomic writes: a save that dies midway leaves the previous file intact and no temporary file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_args

import lit_quant.io as lq_io
import train
from lit_quant.io import atomic_write_text
from lit_quant.training import AtomicCheckpointIO


def test_interrupted_text_write_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")

    def dies(fh):
        fh.write(b"half of the new con")
        raise KeyboardInterrupt  # stands in for a kill between two writes

    with pytest.raises(KeyboardInterrupt):
        lq_io.atomic_write(target, dies)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_checkpoint_save_that_dies_midway_keeps_last_ckpt(tmp_path: Path, monkeypatch) -> None:
    assert train.main(tiny_args(tmp_path, "--run-name", "r", "--epochs", "1")) == 0
    last = tmp_path / "r" / "last.ckpt"
    before = last.read_bytes()

    def partial_save(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 truncated")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(OSError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, last)
    assert last.read_bytes() == before
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert torch.load(last, weights_only=True)["epoch"] == 0
