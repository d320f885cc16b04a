"""lit-quant: fp32 training and quantization of image classifiers on PyTorch Lightning.

The package is layered so imports only go one way:

* :mod:`lit_quant.quant` — pure PyTorch quantization core (never imports Lightning);
* :mod:`lit_quant.nn`, :mod:`lit_quant.models` — plain ``nn.Module`` building blocks and model zoo;
* :mod:`lit_quant.data`, :mod:`lit_quant.module`, :mod:`lit_quant.training` — the Lightning layer;
* ``train.py`` / ``quantize.py`` — thin command-line entry points.

Importing the package itself is cheap and side-effect free.
"""

__version__ = "0.1.0"
