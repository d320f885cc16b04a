"""The ExecuTorch export: a ``.pte`` program whose int8 ops all run in the XNNPACK delegate, run by
``executorch.runtime``, computing what fake quantization computes."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_pt2e import _inputs, _quantized

from lit_quant.deploy.graph import ExportError, agreement
from lit_quant.deploy.pte import PteModel, check_executorch_runtime, export_executorch
from lit_quant.quant import QuantPlan

pytest.importorskip("executorch", reason="the optional extra lit-quant[executorch]; CI installs it")


@pytest.mark.slow
def test_pte_program_runs_in_xnnpack_and_agrees_with_fake_quant(tmp_path: Path) -> None:
    qmodel = _quantized()  # residual add, ReLU6, max pooling, a cat of two grids, Hardswish, float logits
    path = export_executorch(qmodel, _inputs(8, 3), tmp_path / "model.pte")
    assert path.stat().st_size > 1000 and not list(tmp_path.glob("*.tmp*"))
    check = agreement(PteModel(path), qmodel, [_inputs(64, 5)])
    # XNNPACK requantizes with its own fixed-point arithmetic: logits within a tenth of a percent of their range
    assert check["disagree"] == 0 and check["max_logit_diff_share"] < 0.01, check


@pytest.mark.slow
@pytest.mark.parametrize(("plan", "match"), [
    (QuantPlan.from_bits(8, 4), "4-bit activations"),
    (QuantPlan.from_bits(8, 8, weight_scheme="asym_u"), "asym_u weights"),
])
def test_what_xnnpack_cannot_hold_is_refused_in_one_line(plan: QuantPlan, match: str, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=match):
        export_executorch(_quantized(plan), _inputs(8, 3), tmp_path / "model.pte")
    assert not list(tmp_path.iterdir())


def test_missing_executorch_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "executorch" else object())
    with pytest.raises(ExportError, match=r"pip install executorch==1\.5\.1"):
        check_executorch_runtime()
    with pytest.raises(ExportError, match="pip install executorch"):
        PteModel(tmp_path / "model.pte")
