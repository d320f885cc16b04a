"""``pip install .`` / ``pip install -e .``: the wheel holds the library (and only it) and declares its
dependencies (built offline from a copy of the sources, so the repository gets no build folders); the
package root exports the public API without importing torch."""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def _sources(tmp_path: Path) -> Path:
    """What a build reads: pyproject.toml, the README (the long description) and the package."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "lit_quant", src / "lit_quant", ignore=shutil.ignore_patterns("__pycache__"))
    for extra in ("tests", "benchmarks", "tools"):  # present beside the package, as in the repository
        (src / extra).mkdir()
        (src / extra / "__init__.py").write_text("")
    return src


def _metadata(wheel: Path) -> tuple[list[str], email.message.Message]:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        return names, email.message_from_bytes(zf.read(meta))


def test_wheel_holds_the_library_and_declares_its_dependencies(tmp_path: Path) -> None:
    src, out = _sources(tmp_path), tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(out), str(src)], check=True, capture_output=True, text=True)
    wheel = next(out.glob("lit_quant-*.whl"))
    names, meta = _metadata(wheel)
    assert "lit_quant/quant/preparation.py" in names and "lit_quant/callbacks.py" in names
    assert "lit_quant/app/pipeline/qat.py" in names and "lit_quant/deploy/onnx_export.py" in names
    assert {n.split("/")[0] for n in names} == {"lit_quant", wheel.name.split("-py3")[0] + ".dist-info"}
    import lit_quant

    assert meta["Name"] == "lit-quant" and meta["Version"] == lit_quant.__version__
    requires = meta.get_all("Requires-Dist")
    assert "torch==2.14.1" in requires and "torchvision==0.29.1" in requires  # the pair requirements.txt pins
    base = {r.split(";")[0].split("=")[0].split("~")[0].split(">")[0] for r in requires if "extra ==" not in r}
    assert base == {"torch", "torchvision", "pytorch-lightning", "torchmetrics", "rich", "pyyaml",
                    "typing-extensions"}
    assert set(meta.get_all("Provides-Extra")) == {"app", "onnx", "pt2e", "executorch", "all"}


def test_editable_build_points_at_the_sources(tmp_path: Path) -> None:
    """What ``pip install -e .`` installs (PEP 660): the same metadata, and the package found in place."""
    src, out = _sources(tmp_path), tmp_path / "dist"
    out.mkdir()
    code = "import sys, setuptools.build_meta as b; print(b.build_editable(sys.argv[1]))"
    name = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, check=True, capture_output=True,
                          text=True).stdout.strip().splitlines()[-1]
    names, meta = _metadata(out / name)
    assert "torch==2.14.1" in meta.get_all("Requires-Dist")
    with zipfile.ZipFile(out / name) as zf:
        hooks = "".join(zf.read(n).decode() for n in names if n.endswith((".pth", ".py")))
    # the finder maps the one package to its sources (tests, benchmarks and tools are not importable from it)
    assert f"'lit_quant': '{src / 'lit_quant'}'" in hooks and "'tests'" not in hooks


def test_package_root_exports_the_api_and_imports_nothing_heavy() -> None:
    code = ("import sys, lit_quant; heavy = [m for m in ('torch', 'pytorch_lightning', 'yaml') if m in sys.modules]; "
            "print(heavy); from lit_quant import QATCallback, QuantPlan; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "True"]
    import importlib

    import lit_quant

    assert set(lit_quant.__all__) == {"__version__", *lit_quant._EXPORTS}
    for name, module in lit_quant._EXPORTS.items():
        assert getattr(lit_quant, name) is getattr(importlib.import_module(module), name)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        lit_quant.nothing  # noqa: B018
