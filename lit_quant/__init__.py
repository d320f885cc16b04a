"""lit-quant: fp32 training and quantization of image classifiers on PyTorch Lightning.

The package is layered so imports only go one way:

* :mod:`lit_quant.quant` — pure PyTorch quantization core (imports only torch, yaml and itself), with
  :mod:`lit_quant.quant.ops` the ``nn.Module`` operations our models are built from;
* :mod:`lit_quant.models`, :mod:`lit_quant.torchao_ref` (torch.ao's quantization, the reference) and
  :mod:`lit_quant.deploy` — plain PyTorch around the core;
* :mod:`lit_quant.data`, :mod:`lit_quant.classifier`, :mod:`lit_quant.training`, :mod:`lit_quant.pipeline`
  — the Lightning layer;
* ``train.py`` / ``quantize.py`` — thin command-line entry points (their parsers, in
  :mod:`lit_quant.config` and :mod:`lit_quant.pipeline.config`, import no torch).

Importing the package itself is cheap and side-effect free.
"""

__version__ = "0.1.0"
