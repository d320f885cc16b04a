"""PTQ calibration callback through the real Lightning Trainer: same qparams as the core, and under DDP."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import run_script
from ptq_script import run

from lit_quant.callbacks import PTQCalibration
from lit_quant.app.classifier import LitClassifier
from lit_quant.app.data import ClassificationDataModule
from lit_quant.app.models import build_model
from lit_quant.quant import CalibrationError, QuantPlan, calibrate, iter_quantizers, model_qparams, prepare

pytestmark = pytest.mark.slow


def test_callback_calibration_equals_core_calibrate(tmp_path: Path) -> None:
    ours = run(tmp_path, 1, "minmax")
    # the same model and the same calibration images through lit_quant.quant.calibrate directly
    pl.seed_everything(0, verbose=False)
    dm = ClassificationDataModule("fake", image_size=8, batch_size=16, fake_size=128)
    dm.calib_batches = 5
    dm.setup()
    q = prepare(build_model("resnet20", 3, 10).eval(), QuantPlan.from_bits(8, 8, act_observer="minmax"))
    calibrate(q, dm.predict_dataloader())
    direct = model_qparams(q)
    assert {k.removeprefix("model.") for k in ours} == set(direct)
    for name, (scale, zp) in ours.items():
        ref = direct[name.removeprefix("model.")]
        assert torch.equal(scale, ref.scale) and torch.equal(zp, ref.zero_point), name


@pytest.mark.ddp
@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_ddp_two_processes_calibrate_like_one(tmp_path: Path, observer: str) -> None:
    single = run(tmp_path / "one", 1, observer)
    proc = run_script("tests/ptq_script.py", str(tmp_path / "two"), "2", observer)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        ranked = torch.load(tmp_path / "two" / f"rank{rank}.pt", weights_only=True)
        assert ranked.keys() == single.keys()
        for name, (scale, zp) in single.items():
            assert torch.equal(ranked[name][0], scale) and torch.equal(ranked[name][1], zp), (rank, name)
    # and the fake-quantized accuracy over two processes equals one process's
    one = torch.load(tmp_path / "one" / "metrics.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "metrics.pt", weights_only=True)
    assert two["test/top1"] == pytest.approx(one["test/top1"], abs=1e-6)


def test_model_without_quantizers_is_refused() -> None:
    dm = ClassificationDataModule("fake", image_size=8, batch_size=16, fake_size=32)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         callbacks=[PTQCalibration()])
    with pytest.raises(CalibrationError, match="no quantizers"):
        trainer.predict(LitClassifier(build_model("resnet20", 3, 10), 10), datamodule=dm, return_predictions=False)


def test_quantizers_end_in_eval_mode(tmp_path: Path) -> None:
    run(tmp_path, 1, "minmax")  # run() tests with the calibrated model; here check the switches directly
    pl.seed_everything(0, verbose=False)
    lit = LitClassifier(prepare(build_model("resnet20", 3, 10).eval(), QuantPlan.from_bits(8, 8)), 10)
    dm = ClassificationDataModule("fake", image_size=8, batch_size=16, fake_size=64)
    dm.calib_batches = 2
    pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
               callbacks=[PTQCalibration()]).predict(lit, datamodule=dm, return_predictions=False)
    for _, fq in iter_quantizers(lit):
        assert not fq.observer_enabled and fq.fake_quant_enabled and fq.qparams_valid


def test_empty_calibration_set_is_an_error() -> None:
    # Lightning skips an empty predict loop without calling on_predict_start/end; the callback must notice
    lit = LitClassifier(prepare(build_model("resnet20", 3, 10).eval(), QuantPlan.from_bits(8, 8)), 10)
    dm = ClassificationDataModule("fake", image_size=8, batch_size=16, fake_size=32)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         callbacks=[PTQCalibration()])
    dm.calib_batches = 1
    trainer.predict(lit, datamodule=dm, return_predictions=False)  # a calibrated run first: state must reset
    dm.calib_batches = 0
    with pytest.raises(CalibrationError, match="calibration set is empty"):
        trainer.predict(lit, datamodule=dm, return_predictions=False)


class _UserModule(pl.LightningModule):
    """A LightningModule as a user writes one: its own network attribute, loss and metric names."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16),
                                       torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                       torch.nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def _example(cls: type) -> str:
    """The code of the ``Example::`` block of ``cls``'s docstring."""
    import inspect
    import textwrap

    doc = inspect.getdoc(cls) or ""
    return textwrap.dedent(doc.split("Example::", 1)[1])


@pytest.mark.parametrize("name", ["PTQCalibration", "QATCallback"])
def test_docstring_examples_run_on_a_user_module(name: str) -> None:
    """Each callback's ``Example::`` runs as written on a user's trained LightningModule: the network ends
    quantized and keeps the float network's test accuracy (W8A8 PTQ within 5 points, W4A8 QAT within 10)."""
    import lit_quant
    from lit_quant.quant import QuantizedModel

    pl.seed_everything(0, verbose=False)
    dm = ClassificationDataModule("fake", image_size=8, batch_size=32, fake_size=512)
    dm.setup()
    module = _UserModule()
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, dm.train_dataloader())
    fp32 = trainer.test(module, dm.test_dataloader(), verbose=False)[0]["acc"]
    namespace = {"module": module, "train_loader": dm.train_dataloader(), "calib_loader": dm.train_dataloader(),
                 "test_loader": dm.test_dataloader()}
    exec(_example(getattr(lit_quant, name)), namespace)
    assert isinstance(module.net, QuantizedModel)
    quantized = namespace["trainer"].callback_metrics["acc"].item()
    assert fp32 > 0.5 and quantized >= fp32 - (0.05 if name == "PTQCalibration" else 0.10), (fp32, quantized)


def test_qat_callback_state_is_keyed_by_its_network_and_refuses_another_plan() -> None:
    from lit_quant.callbacks import QATCallback
    from lit_quant.quant import QuantConfigError

    plan = QuantPlan.from_bits(8, 8)
    head, body = QATCallback(plan, modules="head"), QATCallback(plan, modules=["body"])
    assert head.state_key != body.state_key and "QATCallback" in head.state_key
    other = QATCallback(QuantPlan.from_bits(4, 8), modules="head")
    assert other.state_key == head.state_key  # so a resumed run with another plan finds, and refuses, the state
    with pytest.raises(QuantConfigError, match="another quantization plan"):
        other.load_state_dict(head.state_dict())
