"""lit-quant: fp32 training and quantization of image classifiers on PyTorch Lightning.

The public API imports from the package root::

    from lit_quant import PTQCalibration, QATCallback, QuantPlan, calibrate, prepare

    plan = QuantPlan.from_bits(weight_bits=8, act_bits=8)
    trainer = pl.Trainer(callbacks=[QATCallback(plan)])   # prepares, calibrates, fine-tunes
    trainer.fit(my_lightning_module, train_loader)

The package is layered so imports only go one way (``tests/quant/test_layering.py``):

* :mod:`lit_quant.quant` — pure PyTorch quantization core (imports only torch, yaml and itself), with
  :mod:`lit_quant.quant.ops` the ``nn.Module`` operations our models are built from;
* :mod:`lit_quant.deploy` — the exporters (torch.ao int8 modules, integer engine, ONNX, PT2E, ExecuTorch)
  on the core, and :func:`export_quantized`, one call from a quantized model to a deployed one;
* :mod:`lit_quant.callbacks` and this package's names — Lightning around the core;
* :mod:`lit_quant.app` — the application behind ``train.py`` / ``quantize.py`` (flags, data, models,
  training, torch.ao's reference rows, the pipeline), which the library never imports; its parsers
  (:mod:`lit_quant.app.config`, :mod:`lit_quant.app.pipeline.config`) import no torch.

Importing the package itself is cheap and side-effect free: the names below are resolved on first use
(PEP 562 module ``__getattr__``), so ``import lit_quant`` loads neither torch nor Lightning, and a script's
``--help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lit_quant.quant.lazy import lazy_exports

__version__ = "0.1.0"

#: Public name -> the module that defines it, imported when the name is first used.
_EXPORTS: dict[str, str] = {
    **{name: "lit_quant.callbacks" for name in ("PTQCalibration", "QATCallback")},
    "export_quantized": "lit_quant.deploy.export",
    **{name: "lit_quant.quant" for name in (
        "CalibrationError", "LayerOverride", "QuantConfigError", "QuantError", "QuantPlan", "QuantSpec",
        "QuantizedModel", "calibrate", "dump_stats", "enable_fake_quant", "enable_observer", "finish_calibration",
        "iter_quantizers", "load_stats", "model_qparams", "prepare", "set_batch_index", "start_calibration")},
}

__all__ = [
    "CalibrationError",
    "LayerOverride",
    "PTQCalibration",
    "QATCallback",
    "QuantConfigError",
    "QuantError",
    "QuantPlan",
    "QuantSpec",
    "QuantizedModel",
    "__version__",
    "calibrate",
    "dump_stats",
    "enable_fake_quant",
    "enable_observer",
    "export_quantized",
    "finish_calibration",
    "iter_quantizers",
    "load_stats",
    "model_qparams",
    "prepare",
    "set_batch_index",
    "start_calibration",
]

if TYPE_CHECKING:  # static analysers and IDEs see the real objects
    from lit_quant.callbacks import PTQCalibration, QATCallback
    from lit_quant.deploy.export import export_quantized
    from lit_quant.quant import (
        CalibrationError,
        LayerOverride,
        QuantConfigError,
        QuantError,
        QuantizedModel,
        QuantPlan,
        QuantSpec,
        calibrate,
        dump_stats,
        enable_fake_quant,
        enable_observer,
        finish_calibration,
        iter_quantizers,
        load_stats,
        model_qparams,
        prepare,
        set_batch_index,
        start_calibration,
    )

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
