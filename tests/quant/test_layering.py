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


#: The library's layers, each with the lit_quant modules it may import (at any depth of its files): core <
#: deploy < callbacks / public API. The application (:mod:`lit_quant.app`) sits above them all and is imported
#: by none; the scripts sit above the application.
SHARED = ("lit_quant.errors", "lit_quant.io", "lit_quant.safe_load")
LIBRARY: dict[str, tuple[str, ...]] = {
    "lit_quant/deploy": ("lit_quant.quant", "lit_quant.deploy", *SHARED),
    "lit_quant/callbacks.py": ("lit_quant.quant", "lit_quant.deploy", "lit_quant.callbacks", "lit_quant.QuantPlan",
                               "lit_quant.PTQCalibration", "lit_quant.QATCallback", *SHARED),
    "lit_quant/io.py": (),
    "lit_quant/safe_load.py": ("lit_quant.errors",),
    "lit_quant/errors.py": (),
    "lit_quant/__init__.py": ("lit_quant.callbacks", "lit_quant.quant", "lit_quant.deploy"),
}


def test_library_layers_import_only_what_is_below_them() -> None:
    bad = []
    for layer, allowed in LIBRARY.items():
        files = sorted((Path(ROOT) / layer).rglob("*.py")) if (Path(ROOT) / layer).is_dir() else [Path(ROOT) / layer]
        assert files and all(f.is_file() for f in files), layer
        bad += [f"{path.relative_to(ROOT)}: {name}" for path in files for name in _imports(path)
                if name.split(".")[0] == "lit_quant" and name != "lit_quant" and not name.startswith(allowed)]
    assert not bad, bad


def test_every_library_file_is_in_a_layer_and_only_the_app_and_scripts_import_the_app() -> None:
    package = Path(ROOT) / "lit_quant"
    layered = [Path(ROOT) / layer for layer in LIBRARY] + [CORE, package / "app"]
    loose = [p.relative_to(ROOT) for p in package.rglob("*.py")
             if not any(p == layer or layer in p.parents for layer in layered)]
    assert not loose, f"files in no layer: {loose}"
    outside = [p for p in package.rglob("*.py") if package / "app" not in p.parents]
    bad = [f"{p.relative_to(ROOT)}: {n}" for p in outside for n in _imports(p) if n.startswith("lit_quant.app")]
    assert not bad, bad


def test_the_work_layer_returns_data_and_only_the_cli_prints() -> None:
    """``lit_quant.app.pipeline`` and ``lit_quant.app.training`` hand back rows, results and messages; the console
    belongs to the CLI and the scripts."""
    app = Path(ROOT) / "lit_quant" / "app"
    files = sorted((app / "pipeline").rglob("*.py")) + [app / "training.py"]
    bad = [f"{p.relative_to(ROOT)}: {n}" for p in files for n in _imports(p) if n.startswith("lit_quant.app.cli")]
    assert not bad, bad
