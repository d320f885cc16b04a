"""The quantization core is pure PyTorch: it imports only torch, yaml and itself (never Lightning, never
torch.ao, nothing else of lit_quant), so it can be used, tested and vendored on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

CORE = Path(ROOT) / "lit_quant" / "quant"


def test_quant_core_does_not_import_lightning() -> None:
    code = ("import sys, lit_quant.quant; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning', "
            "'lightning_fabric')); print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, at any depth of the file (lazy imports inside functions included)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_quant_core_imports_no_torch_ao_and_nothing_of_lit_quant_outside_it() -> None:
    files = sorted(CORE.rglob("*.py"))
    assert files
    bad = [f"{path.relative_to(ROOT)}: {name}" for path in files for name in _imports(path)
           if name.startswith(("torch.ao", "torch.quantization", "torch.nn.quantized"))
           or (name.split(".")[0] == "lit_quant" and not name.startswith("lit_quant.quant"))]
    assert not bad, bad
