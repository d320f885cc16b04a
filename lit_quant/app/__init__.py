"""The application behind ``train.py`` and ``quantize.py``: flags and configs (:mod:`.config`,
:mod:`.pipeline.config`), data (:mod:`.data`), models (:mod:`.models`), the LightningModule
(:mod:`.classifier`), training (:mod:`.training`), mixed precision (:mod:`.precision`), measurements
(:mod:`.measure`), torch.ao's reference rows (:mod:`.torchao_ref`) and ``quantize.py``'s work
(:mod:`.pipeline`). It uses the library (:mod:`lit_quant.quant`, :mod:`lit_quant.deploy`,
:mod:`lit_quant.callbacks`); the library never imports it.

Importing the package imports none of its modules, so the parsers can be built without torch.
"""
