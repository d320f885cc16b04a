"""Pure-PyTorch quantization core (imports only torch, yaml and itself; never Lightning nor torch.ao): specs,
qparams math, fake quantization, observers, fusion, model preparation and calibration statistics.

Typical PTQ::

    plan = QuantPlan.from_bits(weight_bits=4, act_bits=8, act_observer="mse", first_last_bits=8)
    qmodel = prepare(float_model, plan)      # a copy; observers on, fake quant off
    calibrate(qmodel, loader)                # observe, sync across ranks, compute qparams, fake quant on
    Path("stats.yaml").write_text(dump_stats(qmodel))  # next run: load_stats(prepare(model, plan), "stats.yaml")

Names are resolved on first use (PEP 562 module ``__getattr__``), as the root package's are: importing a
torch-free part (``lit_quant.quant.spec``, ``lit_quant.quant.yamlio``) loads no torch.
"""

from __future__ import annotations

from lit_quant.quant.lazy import lazy_exports

#: Public name -> the module that defines it, imported when the name is first used.
_EXPORTS: dict[str, str] = {
    **{name: "lit_quant.quant.errors" for name in (
        "CalibrationError", "QuantConfigError", "QuantError")},
    **{name: "lit_quant.quant.fake_quant" for name in (
        "FakeQuantize", "LSQFakeQuantize", "build_fake_quantize", "enable_fake_quant", "enable_observer",
        "iter_quantizers", "model_qparams", "reset_observers", "set_batch_index", "sync_observers",
        "update_qparams")},
    **{name: "lit_quant.quant.functional" for name in (
        "QParams", "QuantizedTensor", "calculate_qparams", "dequantize", "fake_quantize",
        "lsq_fake_quantize", "quantize")},
    **{name: "lit_quant.quant.fuse" for name in (
        "fold_bn", "fold_bn_weights")},
    **{name: "lit_quant.quant.graph" for name in (
        "fuse_conv_bn", "module_graph", "trace")},
    **{name: "lit_quant.quant.layers" for name in (
        "QuantConv2d", "QuantLinear", "QuantOutput", "QuantWeightLayer")},
    **{name: "lit_quant.quant.optable" for name in (
        "OPS", "OpDef")},
    **{name: "lit_quant.quant.observers" for name in (
        "OBSERVERS", "Observer", "build_observer")},
    **{name: "lit_quant.quant.plan" for name in (
        "LayerOverride", "LayerQuant", "QuantPlan")},
    **{name: "lit_quant.quant.preparation" for name in (
        "QuantizedModel", "calibrate", "finish_calibration", "prepare", "start_calibration")},
    **{name: "lit_quant.quant.spec" for name in (
        "DEFAULT_ACT_SPEC", "DEFAULT_WEIGHT_SPEC", "OBSERVER_NAMES", "SCHEMES", "QuantSpec")},
    **{name: "lit_quant.quant.stats" for name in (
        "dump_stats", "load_stats", "read_stats")},
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
