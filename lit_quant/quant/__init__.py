"""Pure-PyTorch quantization core (imports only torch, yaml and itself; never Lightning nor torch.ao): specs,
qparams math, fake quantization, observers, fusion, model preparation and calibration statistics.

Typical PTQ::

    plan = QuantPlan.from_bits(weight_bits=4, act_bits=8, act_observer="mse", first_last_bits=8)
    qmodel = prepare(float_model, plan)      # a copy; observers on, fake quant off
    calibrate(qmodel, loader)                # observe, sync across ranks, compute qparams, fake quant on
    Path("stats.yaml").write_text(dump_stats(qmodel))  # next run: load_stats(prepare(model, plan), "stats.yaml")
"""

from lit_quant.quant.errors import CalibrationError, QuantConfigError, QuantError
from lit_quant.quant.fake_quant import (
                                        FakeQuantize,
                                        LSQFakeQuantize,
                                        build_fake_quantize,
                                        enable_fake_quant,
                                        enable_observer,
                                        iter_quantizers,
                                        model_qparams,
                                        reset_observers,
                                        set_batch_index,
                                        sync_observers,
                                        update_qparams,
)
from lit_quant.quant.functional import (
                                        QParams,
                                        QuantizedTensor,
                                        calculate_qparams,
                                        dequantize,
                                        fake_quantize,
                                        lsq_fake_quantize,
                                        quantize,
)
from lit_quant.quant.fuse import fold_bn, fold_bn_weights
from lit_quant.quant.graph import fuse_conv_bn, module_graph, trace
from lit_quant.quant.layers import QuantConv2d, QuantLinear, QuantOutput
from lit_quant.quant.observers import OBSERVERS, Observer, build_observer
from lit_quant.quant.plan import LayerOverride, LayerQuant, QuantPlan
from lit_quant.quant.prepare import QuantizedModel, calibrate, finish_calibration, prepare, start_calibration
from lit_quant.quant.spec import (
                                        DEFAULT_ACT_SPEC,
                                        DEFAULT_WEIGHT_SPEC,
                                        OBSERVER_NAMES,
                                        SCHEMES,
                                        QuantSpec,
)
from lit_quant.quant.stats import dump_stats, load_stats, read_stats

__all__ = [
                                        "DEFAULT_ACT_SPEC",
                                        "DEFAULT_WEIGHT_SPEC",
                                        "OBSERVERS",
                                        "OBSERVER_NAMES",
                                        "SCHEMES",
                                        "CalibrationError",
                                        "FakeQuantize",
                                        "LSQFakeQuantize",
                                        "LayerOverride",
                                        "LayerQuant",
                                        "Observer",
                                        "QParams",
                                        "QuantConfigError",
                                        "QuantConv2d",
                                        "QuantError",
                                        "QuantLinear",
                                        "QuantOutput",
                                        "QuantPlan",
                                        "QuantSpec",
                                        "QuantizedModel",
                                        "QuantizedTensor",
                                        "build_fake_quantize",
                                        "build_observer",
                                        "calculate_qparams",
                                        "calibrate",
                                        "dequantize",
                                        "dump_stats",
                                        "enable_fake_quant",
                                        "enable_observer",
                                        "fake_quantize",
                                        "finish_calibration",
                                        "fold_bn",
                                        "fold_bn_weights",
                                        "fuse_conv_bn",
                                        "iter_quantizers",
                                        "load_stats",
                                        "lsq_fake_quantize",
                                        "model_qparams",
                                        "module_graph",
                                        "prepare",
                                        "quantize",
                                        "read_stats",
                                        "reset_observers",
                                        "set_batch_index",
                                        "start_calibration",
                                        "sync_observers",
                                        "trace",
                                        "update_qparams",
]
