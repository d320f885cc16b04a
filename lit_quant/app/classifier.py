"""LitClassifier: any ``nn.Module`` classifier as a LightningModule.

Cross-entropy loss, torchmetrics top-1 / top-5 accuracy and mean loss per stage, logged under namespaced
keys (``train/loss``, ``val/top1``, ``test/top5``, ...), SGD or AdamW with a cosine or one-cycle schedule.
Metrics are torchmetrics objects logged once per epoch, so DDP ranks are synchronised by torchmetrics
(with uneven per-rank batch counts too).

The checkpoint carries the *architecture* (``hparams.arch``: model name, channels, classes, image size,
data set) so that a checkpoint can rebuild its own model (:func:`lit_quant.app.training.load_classifier`), and
the RNG states of every generator so that ``--resume`` continues bit-for-bit where the run left off.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn

from lit_quant.callbacks import stop_when_non_finite
from lit_quant.quant.fake_quant import FakeQuantize

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "onecycle", "none")
#: Learning-rate factor of the first warm-up step (torchvision's reference scripts' ``--lr-warmup-decay``).
WARMUP_START_FACTOR = 0.01


def _stage_metrics(num_classes: int) -> torchmetrics.MetricCollection:
    metrics: dict[str, torchmetrics.Metric] = {
        "top1": torchmetrics.classification.MulticlassAccuracy(num_classes, top_k=1, average="micro"),
    }
    if num_classes >= 5:
        metrics["top5"] = torchmetrics.classification.MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return torchmetrics.MetricCollection(metrics)


def rng_state() -> dict[str, Any]:
    """States of Python's, NumPy's, torch's CPU and (when present) CUDA generators.

    Only plain types and tensors, so checkpoints still load with ``torch.load(weights_only=True)``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {"python": random.getstate(),
                             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def check_rng_state(state: dict[str, Any]) -> None:
    """Raise (``TypeError`` / ``ValueError`` / ``KeyError`` ...) unless :func:`set_rng_state` can restore ``state``:
    it is tried on throw-away generators, so the process's own stay as they are."""
    random.Random().setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.RandomState().set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.Generator().set_state(state["torch"])


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class LitClassifier(pl.LightningModule):
    """Image classifier training / evaluation around ``model``.

    Args:
        model: the network; its output are logits ``(N, num_classes)``.
        num_classes: number of classes (for the metrics).
        arch: how to rebuild ``model`` (stored in the checkpoint; see :func:`lit_quant.app.models.build_model`).
        optimizer: ``sgd`` (momentum, optional Nesterov) or ``adamw``.
        lr: peak learning rate.
        momentum: SGD momentum.
        nesterov: Nesterov momentum for SGD.
        weight_decay: L2 penalty (decoupled for AdamW).
        scheduler: ``cosine`` (per-step cosine decay to 0), ``onecycle``, or ``none``.
        label_smoothing: cross-entropy label smoothing.
        teacher: a frozen network whose logits the training loss also matches (knowledge distillation, used
            by QAT with the fp32 model as teacher); kept out of the state dict, the optimiser and DDP.
        distill_weight: ``alpha`` of the training loss with a teacher (see :meth:`training_loss`).
        distill_temperature: ``T`` of the training loss with a teacher.
        warmup_epochs: linear learning-rate warm-up over this many epochs (fractions allowed; 0: none), with
            ``cosine`` or ``none`` (see :meth:`configure_optimizers`).
    """

    def __init__(self, model: nn.Module, num_classes: int, arch: dict[str, Any] | None = None,
                 optimizer: str = "sgd", lr: float = 0.1, momentum: float = 0.9, nesterov: bool = True,
                 weight_decay: float = 5e-4, scheduler: str = "cosine", label_smoothing: float = 0.0,
                 teacher: nn.Module | None = None, distill_weight: float = 1.0,
                 distill_temperature: float = 1.0, warmup_epochs: float = 0.0) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got '{optimizer}'")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got '{scheduler}'")
        if not 0.0 <= distill_weight <= 1.0 or distill_temperature <= 0:
            raise ValueError(f"distill_weight must be in [0, 1] and distill_temperature positive, got "
                             f"{distill_weight} and {distill_temperature}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if warmup_epochs > 0 and scheduler == "onecycle":
            raise ValueError("warmup_epochs does not combine with the onecycle schedule, which warms up by itself")
        self.save_hyperparameters(ignore=["model", "teacher"])
        self.model = model
        # Not a submodule: the teacher's weights stay out of checkpoints, optimiser and DDP's gradient
        # buckets, and Lightning's train() never switches its BatchNorm to batch statistics.
        self._teacher: tuple[nn.Module, ...] = () if teacher is None else (teacher.eval().requires_grad_(False),)
        # One metric object per stage (Lightning resets and syncs each at its stage's epoch end). Keys carry a
        # suffix because a ModuleDict key "train" would clash with nn.Module.train.
        self.metrics = nn.ModuleDict({f"{s}_": _stage_metrics(num_classes) for s in ("train", "val", "test")})
        self.losses = nn.ModuleDict({f"{s}_": torchmetrics.MeanMetric() for s in ("train", "val", "test")})
        # Per-image top-1 outcome of the last test run, in the test loader's order (under DDP: rank 0's
        # shard, then rank 1's, ... the same order for every model evaluated on the same ranks), for paired
        # comparisons of two models (lit_quant.app.measure.paired_comparison).
        self.test_outcomes = torchmetrics.CatMetric()
        self.test_correct: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @property
    def teacher(self) -> nn.Module | None:
        """The distillation teacher, or None."""
        return self._teacher[0] if self._teacher else None

    def on_fit_start(self) -> None:
        """Put the teacher on this process's device (Lightning moves submodules only)."""
        if self.teacher is not None:
            self.teacher.to(self.device)

    def training_loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy, or with a teacher the distillation loss of Hinton et al. (2015):

        ``(1 - alpha) CE(z, y) + alpha T^2 KL(softmax(t / T) || softmax(z / T))``

        with student logits ``z``, teacher logits ``t`` (eval mode, no gradient), ``alpha`` =
        ``distill_weight`` and ``T`` = ``distill_temperature`` (``T^2`` keeps the gradient's scale
        independent of ``T``). ``alpha = 1`` trains the quantized model to reproduce the fp32 model's output
        distribution, which the labels only approximate.
        """
        hp = self.hparams
        teacher = self.teacher
        if teacher is None:
            return F.cross_entropy(logits, y, label_smoothing=hp.label_smoothing)
        with torch.no_grad():
            # the teacher's own dtype: O2 / O3 hand the student half inputs, the teacher stays fp32
            target = teacher(x.to(next(teacher.parameters()).dtype)).float()
        t = hp.distill_temperature
        kl = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(target / t, dim=1), reduction="batchmean",
                      log_target=True)
        loss = hp.distill_weight * t * t * kl
        if hp.distill_weight < 1.0:  # w = 1 (the default) needs no label term
            loss = loss + (1.0 - hp.distill_weight) * F.cross_entropy(logits, y, label_smoothing=hp.label_smoothing)
        return loss

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        # Loss and metrics in fp32 whatever the model's precision (O2/O3 give half logits).
        with stop_when_non_finite(self._trainer if stage == "train" else None):
            logits = self(x).float()
        loss = self.training_loss(logits, x, y) if stage == "train" else F.cross_entropy(logits, y)
        loss_metric, metrics = self.losses[f"{stage}_"], self.metrics[f"{stage}_"]
        loss_metric.update(loss.detach(), weight=y.numel())
        metrics.update(logits.detach(), y)
        if stage == "test":
            # argmax as MulticlassAccuracy's top-1 takes it, so the outcomes add up to test/top1
            self.test_outcomes.update((logits.detach().argmax(dim=1) == y).float())
        self.log(f"{stage}/loss", loss_metric, on_step=False, on_epoch=True, prog_bar=stage != "test",
                 batch_size=y.numel())
        for name, metric in metrics.items():
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "top1",
                     batch_size=y.numel())
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def on_test_epoch_end(self) -> None:
        """Gather the per-image outcomes of every rank into :attr:`test_correct` (bool, one per test image)."""
        self.test_correct = self.test_outcomes.compute().bool().cpu()
        self.test_outcomes.reset()

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Logits of the batch's images (used for PTQ calibration passes, with ``return_predictions=False``)."""
        return self(batch[0])

    def warmup_steps(self, total: int) -> int:
        """Optimizer steps of the warm-up: ``warmup_epochs`` of the run's ``total`` steps, at most ``total - 1``
        (the epoch length is ``total / max_epochs``; a fraction of an epoch rounds to the nearest step, at least 1)."""
        epochs = self.hparams.warmup_epochs
        if epochs <= 0:
            return 0
        max_epochs = max(1, int(self.trainer.max_epochs or 1))
        return min(total - 1, max(1, round(epochs * total / max_epochs)))

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD/AdamW over all parameters, with a per-step schedule over the whole run.

        Over the ``T`` optimizer steps of the run (step ``t = 0 .. T-1``), ``cosine`` gives
        ``lr(t) = lr * (1 + cos(pi t / T)) / 2`` and ``none`` a constant ``lr``. With ``W`` warm-up steps
        (``warmup_epochs``) that is multiplied by the linear ramp ``s + (1 - s) min(t, W) / W``, ``s`` =
        :data:`WARMUP_START_FACTOR`. Why: the first steps after calibration, whose gradients are several times
        an fp32 model's at low widths, must take a small fraction of the rate. Warm-up and cosine are torch's
        ``LinearLR`` and ``CosineAnnealingLR``, chained, so
        a run without warm-up is the plain ``CosineAnnealingLR`` it always was.

        Learned quantizer scales (LSQ) get no weight decay: decay would shrink every step size towards 0.
        """
        hp = self.hparams
        quantizer_params = {id(p) for m in self.modules() if isinstance(m, FakeQuantize) for p in m.parameters()}
        params = [p for p in self.parameters() if id(p) not in quantizer_params]
        groups = [{"params": params}]
        if quantizer_params:
            groups.append({"params": [p for p in self.parameters() if id(p) in quantizer_params], "weight_decay": 0.0})
        if hp.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum,
                                                         nesterov=hp.nesterov and hp.momentum > 0,
                                                         weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = self.warmup_steps(total)
        schedulers: list[torch.optim.lr_scheduler.LRScheduler] = []
        if hp.scheduler == "cosine":
            schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt, total))
        elif hp.scheduler == "onecycle":
            schedulers.append(torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, total_steps=total))
        if warmup:
            # both are multiplicative per step, so chained they give the product in the docstring
            schedulers.append(torch.optim.lr_scheduler.LinearLR(opt, WARMUP_START_FACTOR, 1.0, total_iters=warmup))
        if not schedulers:
            return {"optimizer": opt}
        sched = schedulers[0] if len(schedulers) == 1 else torch.optim.lr_scheduler.ChainedScheduler(schedulers, opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------------------------ checkpoint hooks
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the RNG states: the next epoch's shuffling and augmentation continue from them on resume."""
        checkpoint["rng_state"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the RNG states saved by :meth:`on_save_checkpoint` when resuming a fit (not on test/load)."""
        trainer = self._trainer
        if "rng_state" in checkpoint and trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            set_rng_state(checkpoint["rng_state"])
