"""Shared test helpers: tiny, fast training arguments on synthetic or written-to-disk data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
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


def kill_after_checkpoint(script: str, args: list[str], checkpoint: Path, timeout: float = 300) -> None:
    """Start ``python <script> args``, wait until ``checkpoint`` exists, let it run into the next epoch, then
    SIGKILL it; asserts that it was really killed (not finished)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not checkpoint.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # into the next epoch
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def report_rows(run: Path) -> list[dict]:
    """The rows of ``<run>/report.json`` written by quantize.py."""
    return json.loads((run / "report.json").read_text())["rows"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint root holding a freshly trained tiny fp32 run ``tiny`` (one per test module)."""
    import train

    root = tmp_path_factory.mktemp("trained") / "checkpoints"
    assert train.main(tiny_args(root, "--run-name", "tiny", "--epochs", "3", "--fake-size", "256")) == 0
    return root


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny models: two threads on a busy two-core machine run them 30x
    slower. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
