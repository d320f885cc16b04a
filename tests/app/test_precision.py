"""Mixed precision: the opt-level mapping and apex-O2 semantics checked through the real Lightning Trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import tiny_args
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import train
from lit_quant.errors import UserError
from lit_quant.app.precision import ApexO2Precision, resolve_precision
from lit_quant.app.training import build_arch, build_classifier


def test_opt_level_mapping() -> None:
    assert resolve_precision(None, None, on_cuda=False) == "32-true"
    assert resolve_precision(None, "O0", on_cuda=False) == "32-true"
    assert resolve_precision(None, "O1", on_cuda=False) == "bf16-mixed"
    assert resolve_precision(None, "O1", on_cuda=True) == "16-mixed"
    assert resolve_precision(None, "O3", on_cuda=False) == "bf16-true"
    assert resolve_precision(None, "O3", on_cuda=True) == "16-true"
    cpu_o2 = resolve_precision(None, "O2", on_cuda=False)
    assert isinstance(cpu_o2, ApexO2Precision) and cpu_o2.dtype == torch.bfloat16 and cpu_o2.scaler is None
    assert resolve_precision("bf16-mixed", None, on_cuda=False) == "bf16-mixed"
    with pytest.raises(UserError, match="choose from O0, O1, O2, O3"):
        resolve_precision(None, "O5", on_cuda=False)


def _o2_trainer(tmp_path: Path, plugin: ApexO2Precision, **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, plugins=[plugin], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), **kw)


class _Tiny(pl.LightningModule):
    """Linear-BN-Linear regression; ``blow_up_first`` makes the first loss overflow fp16."""

    def __init__(self, blow_up_first: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
        self.blow_up_first = blow_up_first

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).float(), y)
        return loss * 1e30 if self.blow_up_first and batch_idx == 0 else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)


def test_o2_half_model_fp32_batchnorm_and_masters(tmp_path: Path) -> None:
    module, plugin = _Tiny(), ApexO2Precision(torch.bfloat16)
    trainer = _o2_trainer(tmp_path, plugin, max_epochs=2)
    trainer.fit(module, _loader())
    lin, bn = module.net[0], module.net[1]
    assert lin.weight.dtype == torch.bfloat16 and bn.weight.dtype == torch.float32
    assert bn.running_mean.dtype == torch.float32
    masters = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert all(p.dtype == torch.float32 for p in masters)
    # every half weight is its master rounded to half precision
    for _, p, master in plugin._pairs:
        assert torch.equal(p, master.to(torch.bfloat16))
    # the checkpoint holds the fp32 masters: an ordinary fp32 model
    trainer.save_checkpoint(tmp_path / "o2.ckpt")
    state = torch.load(tmp_path / "o2.ckpt", weights_only=True)["state_dict"]
    assert state["net.0.weight"].dtype == torch.float32
    assert torch.equal(state["net.0.weight"], next(m for n, _, m in plugin._pairs if n == "net.0.weight"))


def test_o2_fp16_loss_scaling_skips_overflow(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module, plugin = _Tiny(blow_up_first=True), ApexO2Precision(torch.float16)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = _o2_trainer(tmp_path, plugin, max_steps=1)
    trainer.fit(module, _loader())
    # the overflowing step was skipped: masters unchanged, scale backed off from 2**16 to 2**15
    for name, _, master in plugin._pairs:
        assert torch.equal(master, before[name]), name
    assert plugin.scaler.get_scale() == 2.0 ** 15
    assert plugin.state_dict()["scaler"]["scale"] == 2.0 ** 15
    # a normal fp16 step then updates the masters
    module.blow_up_first = False
    trainer = _o2_trainer(tmp_path, plugin := ApexO2Precision(torch.float16), max_steps=2)
    trainer.fit(module, _loader())
    assert any(not torch.equal(m, before[n]) for n, _, m in plugin._pairs)


def test_o2_keeps_updates_that_pure_half_rounds_away(tmp_path: Path) -> None:
    """With a tiny learning rate, bf16 weights (O3) barely move; O2's fp32 masters accumulate the updates."""
    changed = {}
    for level in ("O2", "O3"):
        args = tiny_args(tmp_path / level, "--opt-level", level, "--epochs", "1", "--lr", "1e-4",
                         "--scheduler", "none", "--run-name", "r", "--deterministic")
        assert train.main(args) == 0
        cfg, _ = train.resolve_args(args)
        pl.seed_everything(cfg.seed, verbose=False)  # as run_training does, so these are the run's initial weights
        init = build_classifier(cfg, build_arch(cfg)).model.conv1.weight.detach()
        final = torch.load(tmp_path / level / "r" / "last.ckpt", weights_only=True)["state_dict"]["model.conv1.weight"]
        changed[level] = (final.float() != init.to(final.dtype).float()).float().mean().item()
    assert changed["O2"] > 0.9 and changed["O3"] < 0.5 * changed["O2"], changed


@pytest.mark.parametrize("level", ["O1", "O3"])
def test_other_levels_train(tmp_path: Path, level: str) -> None:
    assert train.main(tiny_args(tmp_path, "--opt-level", level, "--epochs", "1")) == 0
