"""``quantize.py``'s work, one part per module:

* :mod:`~lit_quant.app.pipeline.config` — :class:`QuantizeConfig` and every rule between its flags (light: no torch);
* :mod:`~lit_quant.app.pipeline.rows` — the typed report row, the image-by-image pairs, the report writers;
* :mod:`~lit_quant.app.pipeline.context` — the Trainer, data and folders a run shares, and evaluation into a row;
* :mod:`~lit_quant.app.pipeline.ptq` — our PTQ rows, calibration and the stats file;
* :mod:`~lit_quant.app.pipeline.qat` — our QAT, its recipe and ``--resume``;
* :mod:`~lit_quant.app.pipeline.reference` — torch.ao's rows (static int8, QAT, dynamic, half);
* :mod:`~lit_quant.app.pipeline.deploy` — export rows (int8, integer, onnx) and ``--explain``;
* :mod:`~lit_quant.app.pipeline.checkpoint` — the quantized-checkpoint format;
* :mod:`~lit_quant.app.pipeline.run` — :func:`~lit_quant.app.pipeline.run.run_quantize`, which orchestrates them.

Importing the package imports none of them, so the parser can be built without torch.
"""
