"""The quantized-checkpoint format: save, load and reuse round trip, without a Trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_quant.errors import UserError
from lit_quant.app.models import build_model
from lit_quant.app.pipeline.checkpoint import load_quantized, reusable_ptq, save_quantized
from lit_quant.app.pipeline.rows import Row
from lit_quant.app.training import Arch
from lit_quant.quant import QuantPlan, calibrate, prepare


def test_save_load_round_trip_and_reuse(tmp_path: Path) -> None:
    torch.manual_seed(0)
    arch = Arch("lenet5", "digits", in_channels=1, num_classes=10, image_size=32, small_input=False)
    model = build_model("lenet5", in_channels=1, num_classes=10).eval()
    plan = QuantPlan.from_bits(4, 8)
    q = prepare(model, plan)
    calibrate(q, [torch.randn(8, 1, 32, 32) for _ in range(2)])
    source = {"model": "lenet5", "data": "digits", "weights": "0123"}
    path = tmp_path / "ptq-w4a8.ckpt"
    save_quantized(path, q, plan, arch, {"data": "digits"}, Row("ptq", top1=1.0).to_dict(), source=source)

    loaded, payload = load_quantized(path)
    x = torch.randn(4, 1, 32, 32)
    assert torch.equal(loaded(x), q.eval()(x))
    assert payload["row"]["top1"] == 1.0 and payload["source"] == source
    assert reusable_ptq(path, plan, source) is not None
    assert reusable_ptq(path, QuantPlan.from_bits(8, 8), source) is None  # another plan
    assert reusable_ptq(path, plan, source | {"weights": "other"}) is None  # other fp32 weights
    assert reusable_ptq(tmp_path / "missing.ckpt", plan, source) is None
    torch.save({"state_dict": {}}, tmp_path / "fp32.ckpt")
    with pytest.raises(UserError, match="not a quantized checkpoint"):
        load_quantized(tmp_path / "fp32.ckpt")
