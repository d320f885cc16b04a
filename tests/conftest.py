"""Shared test helpers: tiny, fast training arguments on synthetic or written-to-disk data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(ckpt_dir: Path, *extra: str) -> list[str]:
    """Arguments for a seconds-long run: ResNet-20 on 8x8 synthetic images, 128 training images."""
    return ["--data", "fake", "--fake-size", "128", "--image-size", "8", "--model", "resnet20", "--epochs", "2",
            "--batch-size", "32", "--no-progress", "--checkpoint-dir", str(ckpt_dir), *extra]


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python <script> args`` from the repository as a user would, capturing output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    """A fresh checkpoint root for one test."""
    return tmp_path / "checkpoints"
