"""Mixed precision: Lightning's ``--precision`` values and apex-style ``--opt-level O0..O3``.

The opt levels map onto Lightning as follows ("half" is fp16 on CUDA and bf16 on CPU, where fp16 matmuls are
slow and fp16 gradients underflow without a scaler):

======  ==========================================  =========================================================
level   meaning (apex)                              here
======  ==========================================  =========================================================
O0      pure fp32                                   ``32-true``
O1      autocast mixed precision                    ``16-mixed`` (CUDA) / ``bf16-mixed`` (CPU)
O2      half model except BatchNorm, fp32 master    :class:`ApexO2Precision`: weights and activations in half,
        weights in the optimizer, dynamic loss      BatchNorm in fp32, the optimizer steps fp32 master copies,
        scaling                                     dynamic loss scaling (``torch.amp.GradScaler``) for fp16
O3      pure half                                   ``16-true`` (CUDA) / ``bf16-true`` (CPU)
======  ==========================================  =========================================================
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_utilities import apply_to_collection
from pytorch_lightning.plugins.precision import Precision
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from lit_quant.app.config import PRECISIONS
from lit_quant.errors import UserError
from lit_quant.quant.fake_quant import FakeQuantize
from lit_quant.quant.observers import Observer

OPT_LEVELS = ("O0", "O1", "O2", "O3")


def resolve_precision(precision: str | None, opt_level: str | None, on_cuda: bool) -> str | Precision:
    """Turn ``--precision`` / ``--opt-level`` into what ``Trainer(precision=...)`` or ``plugins=`` take.

    Returns a precision string, or an :class:`ApexO2Precision` plugin for O2.

    Raises:
        UserError: both flags given, or an invalid value.
    """
    if precision is not None and opt_level is not None:
        raise UserError("give either --precision or --opt-level, not both")
    if opt_level is not None:
        if opt_level not in OPT_LEVELS:
            raise UserError(f"invalid opt level '{opt_level}'; choose from {', '.join(OPT_LEVELS)}")
        half = "16" if on_cuda else "bf16"
        if opt_level == "O2":
            return ApexO2Precision(torch.float16 if on_cuda else torch.bfloat16)
        return {"O0": "32-true", "O1": f"{half}-mixed", "O3": f"{half}-true"}[opt_level]
    if precision is None:
        return "32-true"
    if precision not in PRECISIONS:
        raise UserError(f"invalid precision '{precision}'; choose from {', '.join(PRECISIONS)}")
    if precision.startswith("transformer-engine") and importlib.util.find_spec("transformer_engine") is None:
        raise UserError(f"--precision {precision} needs NVIDIA's Transformer Engine on a GPU "
                        "(pip install transformer-engine), which is not installed")
    return precision


class ApexO2Precision(Precision):
    """apex O2: half-precision model except BatchNorm, fp32 master weights, dynamic loss scaling for fp16.

    * :meth:`convert_module` casts the model to ``dtype`` and BatchNorm back to fp32 (its statistics need
      the range; PyTorch's batch norm accepts half inputs with fp32 parameters);
    * :meth:`connect` points each optimizer at fp32 *master* copies of the parameters, so small updates
      ``lr * grad`` are not rounded away in half precision;
    * :meth:`optimizer_step` runs forward/backward on the half model, copies the (scaled) gradients to the
      masters, unscales and skips the step on inf/NaN (``GradScaler``, fp16 only), steps, and copies the
      masters back into the half model;
    * checkpoints store the fp32 master weights as the ``state_dict``, so a checkpoint is an ordinary fp32
      model and resuming restores the masters exactly.
    """

    def __init__(self, dtype: torch.dtype = torch.bfloat16) -> None:
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"O2 needs float16 or bfloat16, got {dtype}")
        self.dtype = dtype
        self.precision = f"O2-{'bf16' if dtype == torch.bfloat16 else 'fp16'}"  # shown as trainer.precision
        # bf16 has fp32's exponent range, so gradients do not underflow and no loss scaling is needed.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.scaler = torch.amp.GradScaler(device) if dtype == torch.float16 else None
        self._pairs: list[tuple[str, nn.Parameter, nn.Parameter]] = []  # (state_dict key, model param, master)
        self._fp32_source: dict[nn.Parameter, Tensor] = {}  # fp32 values before convert_module rounded them

    # ------------------------------------------------------------------------------------------ the model
    def convert_module(self, module: nn.Module) -> nn.Module:
        """Cast to half in place, keeping BatchNorm layers and quantizers in fp32.

        Tensor by tensor, skipping BatchNorm, rather than ``module.to(half)`` followed by ``bn.float()``: the
        round trip would round BatchNorm's running statistics and affine parameters to half precision every
        time a checkpoint is restored, and a resumed run would drift from an uninterrupted one.
        """
        for m in module.modules():
            if isinstance(m, (_BatchNorm, FakeQuantize, Observer)):  # quantizer scales stay fp32 (see FakeQuantize)
                continue
            for p in m.parameters(recurse=False):
                if p.is_floating_point():
                    self._fp32_source[p] = p.data  # exact start value for the master copy (see connect)
                    p.data = p.data.to(self.dtype)  # in place on the Parameter, so DDP/optimizer refs hold
            for name, buf in m.named_buffers(recurse=False):
                if buf.is_floating_point():
                    setattr(m, name, buf.to(self.dtype))
        return module

    def convert_input(self, data: Any) -> Any:
        """Cast floating-point inputs to the model's half dtype."""
        return apply_to_collection(data, Tensor, lambda t: t.to(self.dtype) if t.is_floating_point() else t)

    # ------------------------------------------------------------------------------------------ masters
    def connect(self, model: nn.Module, optimizers: list[Optimizer],
                lr_schedulers: list[Any]) -> tuple[nn.Module, list[Optimizer], list[Any]]:
        """Replace every half parameter in the optimizers by an fp32 master copy.

        Masters start from the fp32 values the model had before :meth:`convert_module` (apex starts from the
        half copy and so loses the low bits of the initial weights); on resume they are then overwritten with
        the checkpoint's fp32 weights in :meth:`on_load_checkpoint`.
        """
        lightning_module = next(m for m in model.modules() if isinstance(m, pl.LightningModule))
        names = {id(p): n for n, p in lightning_module.named_parameters()}
        self._pairs = []
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                masters = []
                for p in group["params"]:
                    if p.dtype == self.dtype:
                        master = nn.Parameter(self._fp32_source.get(p, p.detach()).float().clone())
                        self._pairs.append((names[id(p)], p, master))
                        masters.append(master)
                    else:
                        masters.append(p)  # BatchNorm parameters are already fp32
                group["params"] = masters
        self._fp32_source.clear()
        return model, optimizers, lr_schedulers

    def pre_backward(self, tensor: Tensor, module: pl.LightningModule) -> Tensor:  # type: ignore[override]
        """Scale the loss for fp16 so small gradients survive the backward pass."""
        tensor = super().pre_backward(tensor, module)
        return self.scaler.scale(tensor) if self.scaler is not None else tensor

    def optimizer_step(self, optimizer: Optimizer, model: pl.LightningModule,  # type: ignore[override]
                       closure: Callable[[], Any], **kwargs: Any) -> Any:
        """Forward/backward on the half model, then one fp32 step on the masters (skipped on inf/NaN)."""
        closure_result = closure()
        for _, p, master in self._pairs:
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None  # the optimizer's zero_grad only sees the masters
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # before clipping, so clipping sees true gradient norms
        self._after_closure(model, optimizer)
        if self.scaler is not None:
            self.scaler.step(optimizer, **kwargs)
            self.scaler.update()
        else:
            optimizer.step(**kwargs)
        with torch.no_grad():
            for _, p, master in self._pairs:
                p.copy_(master)
        return closure_result

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The loss scaler's state (empty for bf16)."""
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.scaler is not None and "scaler" in state_dict:
            self.scaler.load_state_dict(state_dict["scaler"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the fp32 masters as the model weights: the checkpoint is an ordinary fp32 model."""
        state = checkpoint.get("state_dict")
        if state is None:
            return
        for name, _, master in self._pairs:
            if name in state:
                state[name] = master.detach().clone()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the masters from the fp32 weights of the checkpoint (the half model got a rounded copy)."""
        state = checkpoint.get("state_dict", {})
        with torch.no_grad():
            for name, _, master in self._pairs:
                if name in state:
                    master.copy_(state[name].float())
