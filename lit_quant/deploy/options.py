"""The exporters' choices and defaults, torch-free so that a command-line parser can offer them without
importing torch: each is defined here once and read by the exporter that owns it and by the flags."""

from __future__ import annotations

#: torch.ao's quantized engines: the int8 export targets them, the reference rows run them.
BACKENDS: tuple[str, ...] = ("fbgemm", "x86", "qnnpack", "onednn")
#: ONNX opset of the QDQ export: 17 is the newest that onnxruntime and most converters read everywhere.
DEFAULT_OPSET = 17
#: Default ``M0`` width of the integer engine's requantization: 31 bits, the Q31 multiplier of gemmlowp /
#: TFLite (``QuantizeMultiplier``); narrower multipliers flip the rounding of some outputs against fake quant.
DEFAULT_SCALE_APPROX_BITS = 31
