"""lit-quant in a user's own Lightning project: LightningModules written here (the network at ``self.net``,
layers on the module itself, ``self.backbone`` + ``self.head``), one callback each, default Trainer settings
(inference mode, sanity check, default ``predict_step``, ``(x, y)`` batches)."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torchmetrics
from conftest import run_script
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lit_quant
from lit_quant import (
    CalibrationError,
    PTQCalibration,
    QATCallback,
    QuantConfigError,
    QuantizedModel,
    QuantPlan,
    calibrate,
    iter_quantizers,
    model_qparams,
    prepare,
)
from lit_quant.quant.fake_quant import LSQFakeQuantize
from lit_quant.quant.layers import QuantConv2d, QuantConvBn2d, QuantLinear, QuantOutput

pytestmark = pytest.mark.slow

CLASSES = 4


# --- the user's project ------------------------------------------------------------------------------------
class Steps(pl.LightningModule):
    """Plain training / validation / test steps on ``(x, y)`` batches, as a user writes them."""

    def __init__(self) -> None:
        super().__init__()
        self.loss = nn.CrossEntropyLoss()  # no parameters: not part of the network
        self.test_acc = torchmetrics.classification.MulticlassAccuracy(CLASSES, average="micro")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _block(conv_bias: bool = False) -> list[nn.Module]:
    return [nn.Conv2d(1, 8, 3, padding=1, bias=conv_bias), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten()]


class NetModule(Steps):
    """The network at ``self.net``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(*_block(), nn.Linear(8, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FlatModule(Steps):
    """Layers defined on the LightningModule itself."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class BackboneHeadModule(Steps):
    """A feature extractor and a classifier in two attributes (``conv_bias``: the first conv has a bias before
    its BatchNorm, as PyTorch's default ``Conv2d`` does)."""

    def __init__(self, conv_bias: bool = False) -> None:
        super().__init__()
        self.backbone = nn.Sequential(*_block(conv_bias))
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


MODULES = {"net": (NetModule, ["net"]), "flat": (FlatModule, ["conv1", "bn1", "conv2", "bn2", "fc"]),
           "backbone-head": (BackboneHeadModule, ["backbone", "head"])}


def _loader(n: int, seed: int, shuffle: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, :, :4].mean((1, 2, 3)) > 0).long()  # learnable labels
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=shuffle)


def _trainer(**kwargs: Any) -> pl.Trainer:
    """A default Trainer, quiet: only logging, checkpoints and the progress bar off."""
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, **kwargs)


def _quantized_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (QuantConv2d, QuantLinear, QuantOutput))]


def _assert_on_output_grid(module: nn.Module, out: torch.Tensor) -> None:
    """``out`` is on the grid of the network's last output quantizer: ``out / s + z`` integers in range (the
    tests that call this quantize the logits, ``io_bits=8``, so that the output shows the quantized model
    ran)."""
    fq = [fq for _, fq in iter_quantizers(module, "act")][-1]
    q = out / fq.scale + fq.zero_point
    assert torch.allclose(q, q.round(), atol=1e-3)
    assert q.min() >= fq.spec.quant_min - 1e-3 and q.max() <= fq.spec.quant_max + 1e-3


# --- QAT ---------------------------------------------------------------------------------------------------
class Record(pl.Callback):
    """What the model looks like during the sanity check, and the first training batches with the qparams
    they are trained with."""

    def __init__(self) -> None:
        self.sanity_fake_quant: list[bool] = []
        self.batches: list[Any] = []
        self.first_step_qparams: dict[str, Any] | None = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking:
            self.sanity_fake_quant += [bool(fq.fake_quant_enabled) for _, fq in iter_quantizers(pl_module)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 0:
            self.batches.append([t.clone() for t in batch])
        if self.first_step_qparams is None:
            self.first_step_qparams = {k: (v.scale.clone(), v.zero_point.clone())
                                       for k, v in model_qparams(pl_module).items()}


@pytest.mark.parametrize("kind", list(MODULES))
def test_qat_one_callback_calibrates_then_fine_tunes(kind: str) -> None:
    cls, names = MODULES[kind]
    pl.seed_everything(0, verbose=False)
    net = cls()
    before = copy.deepcopy(net)
    plan = QuantPlan.from_bits(8, 8, io_bits=8)
    record = Record()
    trainer = _trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1,
                       callbacks=[QATCallback(plan, calibration_batches=2), record])
    trainer.fit(net, _loader(64, 0, shuffle=True), _loader(32, 1))
    assert trainer.state.finished and trainer.global_step == 6

    # every network module is a prepared copy made of lit-quant's layers; the rest of the module is untouched
    for name in names:
        assert isinstance(net.get_submodule(name), QuantizedModel), name
    assert isinstance(net.loss, nn.CrossEntropyLoss) and isinstance(net.test_acc, torchmetrics.Metric)
    assert sum(isinstance(m, QuantConvBn2d) for m in net.modules()) == (0 if kind == "flat" else 2)
    assert len(_quantized_layers(net)) >= 5
    # the sanity check ran before calibration, in float; training ended in the fake-quantized eval state
    assert record.sanity_fake_quant and not any(record.sanity_fake_quant)
    quantizers = dict(iter_quantizers(net))
    assert len(quantizers) >= 6
    for name, fq in quantizers.items():
        assert fq.qparams_valid and fq.fake_quant_enabled and not fq.observer_enabled, name
        assert torch.all(fq.scale > 0), name

    x = _loader(32, 1).dataset.tensors[0]
    net.eval()
    with torch.no_grad():
        out = net(x)
        _assert_on_output_grid(net, out)
        lit_quant.enable_fake_quant(net, False)
        float_out = net(x)  # the same weights without quantization
        lit_quant.enable_fake_quant(net, True)
    assert not torch.equal(out, float_out)

    if kind == "net":
        # calibration ran on the first two training batches, exactly as the core's calibrate on them
        reference = prepare(before.net, plan, qat=True)
        calibrate(reference, record.batches[:2])
        expected = model_qparams(reference)
        assert record.first_step_qparams is not None
        assert {k.removeprefix("net.") for k in record.first_step_qparams} == set(expected)
        for key, (scale, zp) in record.first_step_qparams.items():
            ref = expected[key.removeprefix("net.")]
            assert torch.equal(scale, ref.scale) and torch.equal(zp, ref.zero_point), key

    result = trainer.test(net, _loader(32, 2), verbose=False)[0]
    assert 0.0 <= result["test_acc"] <= 1.0


def test_qat_learns_lsq_step_sizes_through_the_optimizer() -> None:
    """LSQ's per-channel weight step sizes are parameters whose shape calibration sets: the callback gives
    them their shape before Lightning builds the optimizer, so the optimizer trains the ones the model uses."""
    pl.seed_everything(0, verbose=False)
    net = NetModule()
    trainer = _trainer(max_epochs=1, limit_train_batches=4, num_sanity_val_steps=0,
                       callbacks=[QATCallback(QuantPlan.from_bits(4, 4, quantizer="lsq"), calibration_batches=2)])
    trainer.fit(net, _loader(64, 0))
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    lsq = [fq for _, fq in iter_quantizers(net) if isinstance(fq, LSQFakeQuantize)]
    weights = [fq for fq in lsq if fq.kind == "weight"]
    assert weights and all(fq.scale.numel() == 8 for fq in weights[:-1])  # per output channel
    assert all(id(fq.scale) in optimized for fq in lsq)
    assert all(fq.scale.grad is not None and fq.scale.grad.abs().sum() > 0 for fq in lsq)


def test_qat_checkpoint_restores_without_recalibrating(tmp_path) -> None:
    """A QAT checkpoint of a user's module: test(ckpt_path=...) with the callback re-prepares the float
    module and restores its qparams; nothing is calibrated again (no training batch is read)."""
    pl.seed_everything(0, verbose=False)
    plan = QuantPlan.from_bits(8, 8)
    net = NetModule()
    trainer = _trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0,
                       callbacks=[QATCallback(plan, calibration_batches=2)])
    trainer.fit(net, _loader(64, 0))
    trainer.save_checkpoint(tmp_path / "qat.ckpt")
    test = _loader(32, 2)
    expected = trainer.test(net, test, verbose=False)[0]["test_acc"]

    restored = NetModule()
    tester = _trainer(callbacks=[QATCallback(plan)])
    got = tester.test(restored, test, ckpt_path=tmp_path / "qat.ckpt", verbose=False)[0]["test_acc"]
    assert got == expected
    x = test.dataset.tensors[0]
    with torch.no_grad():
        assert torch.equal(restored.eval()(x), net.eval()(x))


def test_qat_keeps_the_calibration_a_network_comes_with() -> None:
    """A network prepared and calibrated beforehand (here on other data) is trained from its own qparams."""
    pl.seed_everything(0, verbose=False)
    plan = QuantPlan.from_bits(8, 8)
    net = NetModule()
    net.net = prepare(net.net, plan, qat=True)
    calibrate(net.net, _loader(32, 5))
    before = {k: v.scale.clone() for k, v in model_qparams(net).items()}
    record = Record()
    _trainer(max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0,
             callbacks=[QATCallback(plan), record]).fit(net, _loader(64, 0))
    assert record.first_step_qparams is not None and record.first_step_qparams.keys() == before.keys()
    assert all(torch.equal(record.first_step_qparams[k][0], scale) for k, scale in before.items())


def test_qat_evaluation_of_an_uncalibrated_network_is_an_error() -> None:
    with pytest.raises(CalibrationError, match="fit it with this callback first"):
        _trainer(callbacks=[QATCallback(QuantPlan.from_bits(8, 8))]).test(NetModule(), _loader(16, 2))


# --- PTQ ---------------------------------------------------------------------------------------------------
def _reference_ptq(float_net: NetModule, plan: QuantPlan, batches: list[Any]) -> NetModule:
    """The explicit path: prepare the network, calibrate it with the core on ``batches``."""
    module = copy.deepcopy(float_net)
    module.net = prepare(module.net, plan)
    calibrate(module.net, batches)
    return module


@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_ptq_one_callback_tests_the_calibrated_model(observer: str) -> None:
    pl.seed_everything(0, verbose=False)
    net = NetModule()
    plan = QuantPlan.from_bits(8, 8, act_observer=observer, io_bits=8)
    calib, test = _loader(64, 0), _loader(48, 2)
    reference = _reference_ptq(net, plan, list(itertools.islice(calib, 3)))

    got = _trainer(callbacks=[PTQCalibration(plan, dataloader=calib, calibration_batches=3)]).test(
        net, test, verbose=False)[0]["test_acc"]
    expected = _trainer().test(reference, test, verbose=False)[0]["test_acc"]
    assert got == expected
    assert isinstance(net.net, QuantizedModel) and len(_quantized_layers(net)) >= 5
    for name, fq in iter_quantizers(net):
        assert fq.qparams_valid and fq.fake_quant_enabled and not fq.observer_enabled, name
    x = test.dataset.tensors[0]
    with torch.no_grad():
        out = net.eval()(x)
        assert torch.equal(out, reference.eval()(x))
        assert not torch.equal(out, reference.net.to_float().eval()(x))
    _assert_on_output_grid(net, out)

    # predict (the default predict_step runs forward on each batch: images only): the quantized outputs
    images = DataLoader(x, batch_size=16)
    predictions = _trainer(callbacks=[PTQCalibration(plan, dataloader=calib)]).predict(net, images)
    assert torch.equal(torch.cat(predictions), out)


class TrainData(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return _loader(64, 0)

    def test_dataloader(self) -> DataLoader:
        return _loader(32, 2)


@pytest.mark.parametrize("kind", ["flat", "backbone-head"])
def test_ptq_calibrates_on_the_datamodule_train_data(kind: str) -> None:
    cls, names = MODULES[kind]
    pl.seed_everything(0, verbose=False)
    net = cls()
    plan = QuantPlan.from_bits(8, 8, io_bits=8)
    float_net = copy.deepcopy(net).eval()
    result = _trainer(callbacks=[PTQCalibration(plan, calibration_batches=2)]).test(
        net, datamodule=TrainData(), verbose=False)[0]
    assert 0.0 <= result["test_acc"] <= 1.0
    for name in names:
        assert isinstance(net.get_submodule(name), QuantizedModel), name
    # BatchNorm on the module itself is its own quantized layer; inside a module it folds into the conv
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == (2 if kind == "flat" else 0)
    for name, fq in iter_quantizers(net):
        assert fq.qparams_valid and fq.fake_quant_enabled, name
    x = _loader(32, 2).dataset.tensors[0]
    with torch.no_grad():
        out = net.eval()(x)
        _assert_on_output_grid(net, out)
        assert not torch.equal(out, float_net(x))
        assert torch.allclose(out, float_net(x), atol=0.1)  # 8 bits: close to the float network


def test_ptq_after_fit_calibrates_on_the_training_loader(tmp_path) -> None:
    """fit the float network, then test its best checkpoint quantized: the same Trainer, the same callback;
    the float checkpoint restores before the network is prepared."""
    pl.seed_everything(0, verbose=False)
    net = NetModule()
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0, logger=False,
                         enable_progress_bar=False, default_root_dir=tmp_path,
                         callbacks=[PTQCalibration(QuantPlan.from_bits(8, 8), calibration_batches=2)])
    trainer.fit(net, _loader(64, 0))
    assert not isinstance(net.net, QuantizedModel)  # fit trains the float network
    trained = copy.deepcopy(net)
    with torch.no_grad():
        net.net[0].weight.zero_()  # only the checkpoint holds the trained weights now
    got = trainer.test(net, _loader(32, 2), ckpt_path="best", verbose=False)[0]["test_acc"]
    reference = _reference_ptq(trained, QuantPlan.from_bits(8, 8), list(itertools.islice(_loader(64, 0), 2)))
    assert got == _trainer().test(reference, _loader(32, 2), verbose=False)[0]["test_acc"]
    x = _loader(32, 2).dataset.tensors[0]
    with torch.no_grad():
        assert torch.equal(net.eval()(x), reference.eval()(x))


def test_ptq_without_calibration_data_is_one_clear_error() -> None:
    trainer = _trainer(callbacks=[PTQCalibration(QuantPlan.from_bits(8, 8))])
    with pytest.raises(CalibrationError, match=r"pass PTQCalibration\(plan, dataloader=\.\.\.\)"):
        trainer.test(NetModule(), _loader(16, 2))


@pytest.mark.ddp
def test_ddp_two_processes_quantize_like_one(tmp_path) -> None:
    """Two CPU processes: every rank calibrates to the qparams of one process on the same batches (QAT on
    the training batches Lightning splits by rank, PTQ on an explicit loader the callback splits)."""
    from user_project_script import run

    single = run(tmp_path / "one", 1)
    proc = run_script("tests/user_project_script.py", str(tmp_path / "two"), "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        ranked = torch.load(tmp_path / "two" / f"rank{rank}.pt", weights_only=True)
        for kind in ("qat", "ptq"):
            assert ranked[kind].keys() == single[kind].keys() and len(single[kind]) >= 12
            for name, value in single[kind].items():
                assert torch.equal(ranked[kind][name], value), (rank, kind, name)


def test_network_modules_can_be_named_and_bad_names_are_refused() -> None:
    net = BackboneHeadModule()
    _trainer(callbacks=[PTQCalibration(QuantPlan.from_bits(8, 8), dataloader=_loader(16, 0),
                                       modules=["head"])]).test(net, _loader(16, 2), verbose=False)
    assert isinstance(net.head, QuantizedModel) and not isinstance(net.backbone, QuantizedModel)
    with pytest.raises(QuantConfigError, match="has no such submodule"):
        _trainer(callbacks=[PTQCalibration(QuantPlan.from_bits(8, 8), dataloader=_loader(16, 0),
                                           modules="neck")]).test(BackboneHeadModule(), _loader(16, 2))
