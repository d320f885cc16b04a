"""The quantization core is pure PyTorch: importing it must not import Lightning."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_quant_core_does_not_import_lightning() -> None:
    code = ("import sys, lit_quant.quant; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning', "
            "'lightning_fabric')); print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
