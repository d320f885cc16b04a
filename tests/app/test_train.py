"""train.py called as a function: outputs, accuracy, config precedence, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import run_script, tiny_args

import train
from lit_quant.app.classifier import WARMUP_START_FACTOR, LitClassifier
from lit_quant.app.cli import run_cli
from lit_quant.app.config import TrainConfig
from lit_quant.app.data import ClassificationDataModule
from lit_quant.app.models import build_model
from lit_quant.app.recipes import train_recipe
from lit_quant.app.training import build_datamodule, load_classifier

pytestmark = pytest.mark.slow


def _test_accuracy(ckpt: Path, cfg: TrainConfig) -> float:
    """Top-1 of a checkpoint on the test split, computed here without Lightning."""
    model = load_classifier(ckpt).eval()
    dm = build_datamodule(cfg)
    dm.setup()
    correct = total = 0
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return 100.0 * correct / total


def test_main_writes_run_outputs(ckpt_dir: Path) -> None:
    assert train.main(tiny_args(ckpt_dir, "--run-name", "tiny")) == 0
    run = ckpt_dir / "tiny"
    for name in ("best.ckpt", "last.ckpt", "config.yaml", "metrics.json", "logs/csv/version_0/metrics.csv"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"] == "fake" and saved["epochs"] == 2 and saved["image_size"] == 8
    assert metrics["epochs"] == 2 and metrics["world_size"] == 1
    # the reported test accuracy is the best checkpoint's, recomputed independently
    cfg = TrainConfig(**saved)
    assert _test_accuracy(run / "best.ckpt", cfg) == pytest.approx(metrics["test/top1"], abs=1e-4)
    csv_header = (run / "logs/csv/version_0/metrics.csv").read_text().splitlines()[0]
    assert {"train/loss", "train/top1", "val/top1", "val/top5"} <= set(csv_header.split(","))


def test_digits_default_recipe_is_accurate(ckpt_dir: Path) -> None:
    """The default (digits, ResNet-20) reaches well above 95 % top-1, here with 6 instead of 15 epochs."""
    assert train.main(["--epochs", "6", "--no-progress", "--checkpoint-dir", str(ckpt_dir)]) == 0
    metrics = json.loads((ckpt_dir / "digits-resnet20" / "metrics.json").read_text())
    assert metrics["test/top1"] > 96.0 and metrics["val/top1"] > 95.0
    assert metrics["test/top5"] > 99.0


def test_yaml_defaults_cli_overrides(tmp_path: Path) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text("data: fake\nepochs: 7\nbatch-size: 16\nmodel: lenet5\n")
    cfg, resume = train.resolve_args(["--config", str(preset), "--epochs", "3", "--no-augment"])
    assert (cfg.data, cfg.epochs, cfg.batch_size, cfg.model, cfg.augment) == ("fake", 3, 16, "lenet5", False)
    assert resume is None and cfg.lr == train_recipe("lenet5").lr and "lr" in cfg.from_recipe
    assert "batch_size" not in cfg.from_recipe  # the preset gave it


def test_shipped_presets_resolve() -> None:
    presets = sorted(Path(train.__file__).parent.glob("configs/*.yaml"))
    assert {p.stem for p in presets} >= {"default", "fashion-mnist-resnet20", "cifar10-resnet20", "cifar10-resnet56",
                                         "cifar10-resnet50", "imagenet-resnet18", "imagenet-resnet50"}
    for preset in presets:
        cfg, _ = train.resolve_args(["--config", str(preset)])
        assert cfg.model and cfg.epochs > 0


def test_help_documents_every_flag(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        train.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--gpus", "--devices", "--num-nodes", "--strategy", "--precision", "--opt-level", "--resume",
                 "--config", "--data-dir", "--deterministic"):
        assert flag in text


def _bad(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert run_cli(train.main, argv, prog="train.py") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("extra,message", [
    (["--model", "resnet21"], "unknown model 'resnet21'"),
    (["--data", "svhn"], "invalid --data 'svhn'; choose from digits"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--batch-size", "-4"], "--batch-size must be positive"),
    (["--precision", "fp8"], "invalid --precision 'fp8'; choose from"),
    (["--opt-level", "O4"], "invalid --opt-level 'O4'"),
    (["--precision", "bf16-mixed", "--opt-level", "O1"], "either --precision or --opt-level"),
    (["--optimizer", "adam"], "invalid --optimizer 'adam'"),
    (["--devices", "two"], "invalid --devices 'two'"),
    (["--model", "lenet5", "--image-size", "28"], "lenet5 needs 32x32"),
    (["--warmup-epochs", "2"], "--warmup-epochs must be in [0, --epochs) = [0, 2)"),
    (["--warmup-epochs", "-0.5"], "--warmup-epochs must be in [0, --epochs)"),
    (["--warmup-epochs", "1", "--scheduler", "onecycle"], "does not combine with --scheduler onecycle"),
])
def test_bad_flags_are_one_line(ckpt_dir: Path, extra: list[str], message: str, capsys) -> None:
    assert message in _bad(tiny_args(ckpt_dir, *extra), capsys)
    assert not ckpt_dir.exists()  # nothing half-written


def test_missing_data_dir(tmp_path: Path, capsys) -> None:
    err = _bad(tiny_args(tmp_path / "ck", "--data", "mnist", "--data-dir", str(tmp_path / "nowhere")), capsys)
    assert "train-images-idx3-ubyte" in err and "nowhere" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_gpus_without_cuda_suggests_cpu_ddp(ckpt_dir: Path, capsys) -> None:
    err = _bad(tiny_args(ckpt_dir, "--gpus", "4"), capsys)
    assert "CUDA is not available" in err and "--accelerator cpu --devices 4" in err


def test_missing_config_and_unknown_key(tmp_path: Path, capsys) -> None:
    assert "not found" in _bad(["--config", str(tmp_path / "none.yaml")], capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    assert "unknown config key(s): epochz" in _bad(["--config", str(bad)], capsys)


def test_unknown_flag_exits_2_with_one_line() -> None:
    proc = run_script("train.py", "--epocs", "3")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unrecognized arguments: --epocs" in proc.stderr


def test_resume_rejects_corrupt_mismatched_and_missing(ckpt_dir: Path, tmp_path: Path, capsys) -> None:
    assert "no */last.ckpt" in _bad(tiny_args(ckpt_dir, "--resume", "last"), capsys)
    assert "not found" in _bad(tiny_args(ckpt_dir, "--resume", str(tmp_path / "x.ckpt")), capsys)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x80\x04not a checkpoint at all")
    assert "cannot read checkpoint" in _bad(tiny_args(ckpt_dir, "--resume", str(garbage)), capsys)
    assert train.main(tiny_args(ckpt_dir, "--epochs", "1", "--run-name", "r20")) == 0
    last = ckpt_dir / "r20" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[:1000])
    assert "cannot read checkpoint" in _bad(tiny_args(ckpt_dir, "--resume", str(truncated)), capsys)
    # resuming ResNet-20's checkpoint as LeNet-5 is refused, naming both
    err = _bad(tiny_args(ckpt_dir, "--resume", str(last), "--model", "lenet5", "--image-size", "32"), capsys)
    assert "does not match this run" in err and "'resnet20' vs 'lenet5'" in err


def test_corrupt_checkpoint_no_traceback_from_the_script(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"PK\x03\x04broken zip")
    proc = run_script("train.py", *tiny_args(tmp_path / "ck", "--resume", str(garbage)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "cannot read checkpoint" in proc.stderr


def test_best_checkpoint_breaks_top1_ties_with_the_lower_loss(tmp_path: Path) -> None:
    """Lightning keeps the first maximum; best.ckpt keeps the tied model of lower val/loss (real Trainer)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from lit_quant.app.training import BestCheckpoint

    top1 = [0.5, 0.9, 0.8, 0.9, 0.9, 0.7]
    loss = [2.0, 0.6, 0.5, 0.4, 0.45, 0.1]  # epoch 3: same top-1 as epoch 1, lower loss; epoch 4 does not beat it

    class Scripted(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.w - 1).pow(2).sum()

        def validation_step(self, batch, batch_idx) -> None:
            self.log("val/top1", top1[self.current_epoch])
            self.log("val/loss", loss[self.current_epoch])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=1)

        val_dataloader = train_dataloader

    best = BestCheckpoint(dirpath=str(tmp_path), filename="best", monitor="val/top1", tie_break="val/loss",
                          enable_version_counter=False)
    pl.Trainer(max_epochs=len(top1), logger=False, enable_progress_bar=False, enable_model_summary=False,
               callbacks=[best]).fit(Scripted())
    saved = torch.load(tmp_path / "best.ckpt", weights_only=True)
    assert saved["epoch"] == 3 and best.best_tie_break == pytest.approx(0.4)
    assert float(best.best_model_score) == pytest.approx(0.9)
    # the kept tie-break travels with the callback state, so a resumed run keeps comparing against it
    # under ModelCheckpoint's key, so runs checkpointed by a plain ModelCheckpoint resume into it too
    key = ModelCheckpoint(monitor="val/top1", mode="max").state_key
    assert saved["callbacks"][key]["best_tie_break"] == pytest.approx(0.4)
    resumed = BestCheckpoint(dirpath=str(tmp_path), filename="best", monitor="val/top1", tie_break="val/loss")
    resumed.load_state_dict(saved["callbacks"][key])
    assert resumed.best_tie_break == pytest.approx(0.4) and float(resumed.best_model_score) == pytest.approx(0.9)


class _LearningRates(pl.Callback):
    """The learning rate each optimizer step of a fit runs with."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("scheduler,warmup_epochs", [("cosine", 1.0), ("cosine", 0.5), ("none", 2.0), ("cosine", 0.0)])
def test_warmup_schedule_is_the_documented_formula(scheduler: str, warmup_epochs: float) -> None:
    dm = ClassificationDataModule("fake", image_size=8, batch_size=16, fake_size=128)
    lit = LitClassifier(build_model("resnet20", 3, 10), 10, lr=0.05, scheduler=scheduler, warmup_epochs=warmup_epochs)
    record = _LearningRates()
    pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False, enable_checkpointing=False,
               enable_model_summary=False, callbacks=[record]).fit(lit, datamodule=dm)
    total = len(record.lrs)
    per_epoch = total // 3
    assert total == 3 * per_epoch and per_epoch >= 6
    w = round(warmup_epochs * per_epoch)
    for t, lr in enumerate(record.lrs):
        ramp = 1.0 if w == 0 else WARMUP_START_FACTOR + (1 - WARMUP_START_FACTOR) * min(t, w) / w
        decay = 0.5 * (1 + math.cos(math.pi * t / total)) if scheduler == "cosine" else 1.0
        assert lr == pytest.approx(0.05 * ramp * decay, rel=1e-9), (t, record.lrs)
    if w:
        assert record.lrs[0] == pytest.approx(0.05 * WARMUP_START_FACTOR) and max(record.lrs) <= 0.05
