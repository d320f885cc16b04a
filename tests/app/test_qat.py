"""QAT: simulated BN folding, fp32 fake quant under autocast, the QAT callback through the real Trainer
(DDP, bf16, resume after SIGKILL) and quantize.py --mode qat against torch.ao's QAT."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import kill_after_checkpoint, report_rows, run_script
from qat_script import run as run_qat_script
from torch.ao.quantization import FakeQuantizeBase

import quantize
from lit_quant.callbacks import PTQCalibration, QATCallback
from lit_quant.app.classifier import LitClassifier
from lit_quant.app.cli import run_cli
from lit_quant.app.data import ClassificationDataModule
from lit_quant.deploy.engines import available_backends
from lit_quant.app.models import build_model
from lit_quant.app.pipeline.reference import BuiltinQATSchedule
from lit_quant.quant import QuantPlan, calibrate, enable_fake_quant, enable_observer, iter_quantizers, prepare
from lit_quant.quant.fake_quant import FakeQuantize, LSQFakeQuantize
from lit_quant.quant.layers import QuantConvBn2d, freeze_bn_stats
from lit_quant.quant.spec import QuantSpec
from lit_quant.app.torchao_ref import builtin_qat_prepare

pytestmark = pytest.mark.slow


def _bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet20", 3, 10)
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 3, 8, 8))  # non-trivial running statistics
    return model.eval()


def test_conv_bn_folds_as_it_trains() -> None:
    model, x = _bn_model(), torch.randn(16, 3, 8, 8)
    q = prepare(model, QuantPlan.from_bits(8, 8, act_observer="ema"), qat=True)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert n_bn > 0 and sum(isinstance(m, QuantConvBn2d) for m in q.modules()) == n_bn  # every pair
    enable_fake_quant(q, False)
    with torch.no_grad():
        assert torch.allclose(q.eval()(x), model.eval()(x), atol=1e-5)  # eval: the folded deploy form
        train_ref = copy.deepcopy(model).train()(x)
        assert torch.allclose(q.train()(x), train_ref, atol=1e-5)  # training: batch statistics, as Conv-BN
        q.eval()
        assert torch.allclose(q.to_float().eval()(x), q(x), atol=1e-5)  # to_float is the folded conv
        calibrate(q, [x])
        enable_observer(q, False)
        q.train()
        freeze_bn_stats(q)
        # frozen BatchNorm in training computes exactly what is deployed
        assert torch.equal(q(x), q.eval()(x))


@pytest.mark.parametrize("method,observer", [("ste", "ema"), ("lsq", "ema"), ("lsq", "mse")])
def test_fused_relu_and_observer_step_equals_the_unfused_step(method: str, observer: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A QAT step as the callback runs it (qparams fixed within the step, observers on): ReLUs applied
    inside their output quantizers and (EMA) observer ranges read in the fake-quant pass give the loss,
    every gradient and every observer's state of the unfused step (ReLU module, then the observer's own
    pass); a histogram observer (mse) sees the same ReLU output. LSQ's scale gradients differ only by
    summation order (float64 in the kernel)."""
    from lit_quant.quant import update_qparams
    from lit_quant.quant.fake_quant import set_step_qparams
    from lit_quant.quant.layers import QuantOutput
    from lit_quant.quant.observers import EMAMinMaxObserver

    model, x, y = _bn_model(), torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    q = prepare(model, QuantPlan.from_bits(8, 8, act_observer=observer, quantizer=method), qat=True)
    calibrate(q, [x])
    set_step_qparams(q, True)
    enable_observer(q, True)
    enable_fake_quant(q, True)
    update_qparams(q, kind="act")
    q.train()
    assert sum(isinstance(m, QuantOutput) and type(m.module) is torch.nn.ReLU for m in q.modules()) >= 9

    def step(model: torch.nn.Module) -> tuple[float, dict, dict]:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        states = {f"{n}.{k}": v.clone() for n, fq in iter_quantizers(model, "act")
                  for k, v in fq.observer.state_dict().items()}
        return loss.item(), grads, states

    fused = step(copy.deepcopy(q))
    monkeypatch.setattr(EMAMinMaxObserver, "RANGE_ONLY", False)
    monkeypatch.setattr(QuantOutput, "forward", lambda self, *a: self.act_quant(self.module(*a)))
    unfused = step(copy.deepcopy(q))
    assert fused[0] == unfused[0]
    for name, grad in unfused[1].items():
        exact = not name.endswith("scale")
        torch.testing.assert_close(fused[1][name], grad, atol=0 if exact else 1e-9, rtol=0 if exact else 1e-4,
                                   msg=name)
    assert fused[2].keys() == unfused[2].keys() and len(fused[2]) >= 19
    for name, state in unfused[2].items():
        assert torch.equal(fused[2][name], state), name


@pytest.mark.parametrize("momentum", [0.1, None])
def test_rescaled_batch_norm_equals_the_module_path(momentum: float | None) -> None:
    """The single-process fast path (BatchNorm of ``z / f`` computed on ``z``) against the general one that
    SyncBatchNorm takes (the module normalising ``z * (1/f)``; SyncBatchNorm outside a process group is a
    plain BatchNorm): outputs, gradients of the input and every parameter, running statistics and the batch
    count, over three training steps. Signed gammas and a conv bias exercise ``|gamma|`` and the bias shift."""
    model = _bn_model()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5)
                m.bias.normal_()
                m.momentum = momentum
        model.conv1.bias = torch.nn.Parameter(torch.randn(model.conv1.out_channels))
    fast = prepare(model, QuantPlan.from_bits(8, 8, act_observer="ema"), qat=True)
    enable_fake_quant(fast, False)  # the BatchNorm arithmetic itself, not rounding that would hide it
    slow = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(fast))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in slow.modules())
    fast.train(), slow.train()
    for _ in range(3):
        x = torch.randn(16, 3, 8, 8)
        results = []
        for m in (fast, slow):
            xi = x.clone().requires_grad_()
            out = m(xi)
            (out * torch.linspace(-1, 2, out.numel()).reshape(out.shape)).sum().backward()
            # the conv bias cancels in the batch mean: no gradient on the fast path, ~0 on the module path
            results.append((out.detach(), xi.grad, {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                                    for n, p in m.named_parameters()}))
            m.zero_grad()
        (o1, g1, p1), (o2, g2, p2) = results
        torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
        assert p1.keys() == p2.keys()
        for name in p1:
            torch.testing.assert_close(p1[name], p2[name], rtol=1e-4, atol=1e-5, msg=name)
    b1, b2 = dict(fast.named_buffers()), dict(slow.named_buffers())
    for name in (n for n in b1 if "running" in n or "num_batches" in n):
        torch.testing.assert_close(b1[name], b2[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fake_quant_runs_in_fp32_under_autocast() -> None:
    fq = FakeQuantize(QuantSpec(8, "asym_u", observer="minmax"))
    x = torch.rand(64, 32) * 1e-3  # small values: a bf16 scale would move them off the integer grid
    fq(x)
    enable_fake_quant(fq, True)
    enable_observer(fq, False)
    xb = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fq(xb)
    assert out.dtype == torch.bfloat16 and fq.scale.dtype == torch.float32
    assert torch.equal(out, fq(xb.float()).bfloat16())  # computed in fp32, only the result is rounded
    # the arithmetic done in bf16 instead would give other values: the fp32 path is not a no-op
    s = fq.scale.bfloat16()
    naive = (torch.clamp(torch.round(xb / s) + fq.zero_point, 0, 255) - fq.zero_point) * s
    assert not torch.equal(out, naive.bfloat16())


@pytest.mark.ddp
def test_ddp_ranks_share_qparams_at_every_step(tmp_path: Path) -> None:
    proc = run_script("tests/qat_script.py", str(tmp_path), "2", "ste")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) >= 4
    for step, (a, b) in enumerate(zip(*ranks, strict=True)):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"ranks differ at step {step}"
    # ...and the ranges really moved during training (the comparison above is not between constants)
    assert any(not torch.equal(ranks[0][0][k], ranks[0][-1][k]) for k in ranks[0][0])


def test_lsq_scales_learn(tmp_path: Path) -> None:
    steps = run_qat_script(tmp_path, 1, "lsq")
    assert len(steps) >= 4
    assert any(not torch.equal(steps[0][k], steps[-1][k]) for k in steps[0] if k.endswith("scale"))


def test_lsq_learns_weight_steps_below_8_bits_only() -> None:
    """Under LSQ the 8-bit first and last layers of a low-bit plan keep weight ranges that follow their
    weights; narrower weights and every activation (8-bit ones included) learn their steps."""
    q = prepare(_bn_model(), QuantPlan.from_bits(4, 4, quantizer="lsq", first_last_bits=8), qat=True)
    weights = {(fq.spec.bits, type(fq)) for _, fq in iter_quantizers(q, "weight")}
    assert weights == {(8, FakeQuantize), (4, LSQFakeQuantize)}
    acts = [(fq.spec.bits, type(fq)) for _, fq in iter_quantizers(q, "act")]
    assert {bits for bits, _ in acts} == {4, 8} and all(kind is LSQFakeQuantize for _, kind in acts)


def _fit_losses(precision: str) -> list[float]:
    pl.seed_everything(0, verbose=False)
    dm = ClassificationDataModule("fake", image_size=8, batch_size=16, fake_size=64, augment=False)
    dm.calib_batches = 2
    plan = QuantPlan.from_bits(8, 8, act_observer="ema")
    lit = LitClassifier(prepare(_bn_model(), plan, qat=True), 10, lr=0.01, scheduler="none")
    losses: list[float] = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, max_epochs=1, inference_mode=False,
                         callbacks=[PTQCalibration(), QATCallback(plan), Losses()])
    trainer.predict(lit, datamodule=dm, return_predictions=False)
    trainer.fit(lit, datamodule=dm)
    return losses


def test_bf16_qat_loss_matches_fp32() -> None:
    fp32, bf16 = _fit_losses("32-true"), _fit_losses("bf16-mixed")
    assert len(fp32) == len(bf16) == 4
    for a, b in zip(fp32, bf16, strict=True):
        assert b == pytest.approx(a, rel=0.05), (fp32, bf16)


# ------------------------------------------------------------------------------------------ quantize.py
def test_qat_report_and_reload(trained: Path, capsys) -> None:
    assert quantize.main(["--checkpoint-dir", str(trained), "--mode", "qat", "--bits", "4", "--epochs", "2",
                          "--lr", "0.01", "--calib-batches", "2", "--no-latency", "--export", "integer", "onnx"]) == 0
    rows = {(r["variant"], r["source"]): r for r in report_rows(trained / "tiny")}
    assert set(rows) == {("fp32", None), ("ptq", None), ("integer", "ptq"), ("onnx", "ptq"), ("qat", None),
                         ("integer", "qat"), ("onnx", "qat"), ("builtin-qat", None)}
    exported = {k: r for k, r in rows.items() if k[1] == "qat"}
    rows = {variant: r for (variant, source), r in rows.items() if source is None}
    # the QAT model (Conv-BN folded as it trained) deploys: integer engine and onnxruntime on its integers
    assert abs(exported["onnx", "qat"]["top1"] - rows["qat"]["top1"]) <= 0.5
    differ, images = map(int, re.search(r"differ from fake-quant on (\d+) of (\d+)",
                                        exported["integer", "qat"]["note"]).groups())
    assert differ <= 0.1 * images  # 4-bit near-ties only (measured 2 of 64); the exact bound is in test_deploy
    assert (trained / "tiny" / "qat-w4a4-deploy.pt").is_file() and (trained / "tiny" / "qat-w4a4.onnx").is_file()
    # the 4-bit recipe: LSQ from the GPTQ / bias-corrected mse PTQ model (the PTQ row's), first and last layers
    # at 8 bits, one warm-up epoch (flags given win)
    assert rows["qat"]["weight_bits"] == rows["qat"]["act_bits"] == 4 and rows["qat"]["observer"] == "mse"
    assert "4-bit QAT recipe: lsq, mse activation and mse weight ranges from PTQ with GPTQ and bias correction" \
        in rows["qat"]["note"]
    assert "GPTQ weight rounding + bias correction" in rows["ptq"]["note"]
    assert "overrides: @first w8 a8, @last w8 a8" in rows["qat"]["note"] or "input" in rows["qat"]["note"]
    epoch, best = re.search(r"kept epoch (\d) \(best validation top-1 ([\d.]+);", rows["qat"]["note"]).groups()
    assert rows["builtin-qat"]["size_bytes"] < 0.35 * rows["fp32"]["size_bytes"]  # real int8 model
    assert abs(rows["builtin-qat"]["top1"] - rows["fp32"]["top1"]) <= 5.0
    saved = trained / "tiny" / "qat-w4a4.ckpt"
    assert (trained / "tiny" / "qat-w4a4" / "last.ckpt").is_file()
    assert quantize.main(["--eval", str(saved)]) == 0
    assert "qat (reloaded)" in capsys.readouterr().out
    from lit_quant.app.pipeline.checkpoint import evaluate_quantized

    assert evaluate_quantized(saved, batch_size=50)["top1"] == pytest.approx(rows["qat"]["top1"], abs=1e-9)
    # the kept epoch: the calibrated start (epoch 0) unless an epoch's validation top-1 beat it; its Lightning
    # checkpoint restores through Trainer.test(ckpt_path=...) with the callback re-preparing
    start = torch.load(trained / "tiny" / "qat-w4a4" / "start.pt", weights_only=True)
    best_ckpt = torch.load(trained / "tiny" / "qat-w4a4" / "best.ckpt", weights_only=False)
    best_state = next(v for k, v in best_ckpt["callbacks"].items() if "val/top1" in k)
    # epochs are ordered by validation top-1, then by lower validation loss
    best_key = (float(best_state["best_model_score"]), -best_state["best_tie_break"])
    if int(epoch) == 0:
        assert best_key <= (start["val_top1"], -start["val_loss"])
        assert float(best) == pytest.approx(100 * start["val_top1"], abs=0.005)  # the note has 2 decimals
    else:
        assert best_key > (start["val_top1"], -start["val_loss"]) and int(epoch) == best_ckpt["epoch"] + 1
        plan = QuantPlan.from_dict(torch.load(saved, weights_only=True)["plan"])
        lit = LitClassifier(build_model("resnet20", 3, 10), 10)
        dm = ClassificationDataModule("fake", image_size=8, batch_size=32, fake_size=256)
        tested = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_checkpointing=False, callbacks=[QATCallback(plan)], inference_mode=False).test(
            lit, datamodule=dm, ckpt_path=str(trained / "tiny" / "qat-w4a4" / "best.ckpt"), verbose=False)[0]
        assert 100.0 * tested["test/top1"] == pytest.approx(rows["qat"]["top1"], abs=1e-6)


def test_qat_sigkill_then_resume_matches_uninterrupted(trained: Path, tmp_path: Path) -> None:
    # BatchNorm trains for two epochs and freezes at the third, the learning rate warms up over the first two:
    # the resumed run crosses both schedule changes (the warm-up is a chained scheduler whose state must load)
    common = ["--mode", "qat", "--bits", "4", "--epochs", "4", "--deterministic", "--no-builtin-qat",
              "--no-latency", "--calib-batches", "2", "--batch-size", "16", "--lr", "0.01", "--freeze-bn-epoch", "2",
              "--warmup-epochs", "1.5"]
    runs = {}
    for name in ("ref", "killed"):
        run = tmp_path / name / "tiny"
        run.mkdir(parents=True)
        for f in ("best.ckpt", "config.yaml"):
            (run / f).write_bytes((trained / "tiny" / f).read_bytes())
        runs[name] = run
    reference = run_script("quantize.py", "--ckpt", str(runs["ref"] / "best.ckpt"), *common)
    assert reference.returncode == 0, reference.stderr[-2000:]

    last = runs["killed"] / "qat-w4a4" / "last.ckpt"
    kill_after_checkpoint("quantize.py", ["--ckpt", str(runs["killed"] / "best.ckpt"), *common], last)
    assert torch.load(last, weights_only=True)["epoch"] < 3  # really interrupted

    resumed = run_script("quantize.py", "--ckpt", str(runs["killed"] / "best.ckpt"), *common, "--resume", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(last, weights_only=True)
    b = torch.load(runs["ref"] / "qat-w4a4" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"]
    differ = [k for k in b["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differ, differ[:5]
    qat = [r for r in report_rows(runs["killed"]) if r["variant"] == "qat"][0]
    assert qat["top1"] == [r for r in report_rows(runs["ref"]) if r["variant"] == "qat"][0]["top1"]


@pytest.mark.parametrize("argv,message", [
    (["--mode", "qat", "--epochs", "2", "--freeze-bn-epoch", "-1"], "must be a non-negative epoch"),
    (["--epochs", "2"], "is a QAT setting: add --mode qat"),
    (["--mode", "qat", "--resume", "BEST"], "not a QAT checkpoint"),
    (["--mode", "qat", "--qat-method", "adaround"], "invalid --qat-method"),
    (["--distill"], "is a QAT setting: add --mode qat"),
    (["--mode", "qat", "--distill", "--distill-weight", "1.5"], "--distill-weight must be in [0, 1]"),
    (["--mode", "qat", "--distill", "--distill-temperature", "0"], "--distill-temperature must be positive"),
    (["--mode", "qat", "--distill-temperature", "2"], "add --distill"),
    (["--mode", "qat", "--epochs", "2", "--warmup-epochs", "2"], "--warmup-epochs must be in [0, --epochs) = [0, 2)"),
    (["--warmup-epochs", "1"], "is a QAT setting: add --mode qat"),
    (["--mode", "qat", "--bits", "16", "--qat-method", "lsq"], "--qat-method lsq is for widths of at most 8 bits"),
    (["--mode", "qat", "--weight-bits", "4", "--act-bits", "12", "--qat-method", "lsq"], "got --act-bits 12"),
])
def test_qat_bad_input(trained: Path, argv: list[str], message: str, capsys) -> None:
    argv = [a if a != "BEST" else str(trained / "tiny" / "best.ckpt") for a in argv]
    before = sorted(p.name for p in (trained / "tiny").iterdir())
    assert run_cli(quantize.main, ["--checkpoint-dir", str(trained), "--no-latency", *argv], prog="quantize.py") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in (trained / "tiny").iterdir()) == before


def test_callback_refuses_a_model_quantized_with_another_plan() -> None:
    lit = LitClassifier(prepare(_bn_model(), QuantPlan.from_bits(8, 8), qat=True), 10)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, max_epochs=1,
                         callbacks=[QATCallback(QuantPlan.from_bits(4, 4))])
    dm = ClassificationDataModule("fake", image_size=8, batch_size=16, fake_size=32)
    with pytest.raises(Exception, match="different plan"):
        trainer.fit(lit, datamodule=dm)


def test_quantizers_stay_fp32_under_o2() -> None:
    from lit_quant.app.precision import ApexO2Precision

    q = prepare(_bn_model(), QuantPlan.from_bits(8, 8), qat=True)
    ApexO2Precision(torch.bfloat16).convert_module(q)
    for _, fq in iter_quantizers(q):
        assert fq.scale.dtype == torch.float32
    assert next(m for m in q.modules() if isinstance(m, QuantConvBn2d)).weight.dtype == torch.bfloat16


@pytest.mark.ddp
def test_qat_from_the_command_line_on_two_processes(trained: Path, tmp_path: Path) -> None:
    run = tmp_path / "tiny"
    run.mkdir()
    for f in ("best.ckpt", "config.yaml"):
        (run / f).write_bytes((trained / "tiny" / f).read_bytes())
    proc = run_script("quantize.py", "--ckpt", str(run / "best.ckpt"), "--mode", "qat", "--bits", "4", "--epochs", "2",
                      "--accelerator", "cpu", "--devices", "2", "--no-builtin-qat", "--no-latency",
                      "--calib-batches", "2", "--batch-size", "16", "--distill", "--warmup-epochs", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("lit-quant: fp32 vs ours vs torch.ao") == 1
    rows = {r["variant"]: r for r in report_rows(run)}
    assert set(rows) == {"fp32", "ptq", "qat"}
    assert "distilled from fp32 w=1 T=1, lr warm-up 0.5 epochs" in rows["qat"]["note"]
    assert torch.load(run / "qat-w4a4" / "last.ckpt", weights_only=True)["epoch"] == 1
    from lit_quant.app.pipeline.checkpoint import evaluate_quantized

    # the saved model (rank 0's) reproduces the accuracy both ranks evaluated together
    assert evaluate_quantized(run / "qat-w4a4.ckpt", batch_size=32)["top1"] == pytest.approx(rows["qat"]["top1"],
                                                                                            abs=1e-6)


def test_lsq_with_per_channel_activations_is_refused(trained: Path, tmp_path: Path, capsys) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("act: {bits: 4, quantizer: lsq, per_channel: true, axis: 1}\n")
    assert run_cli(quantize.main, ["--checkpoint-dir", str(trained), "--mode", "qat", "--plan", str(plan),
                                   "--no-latency"], prog="quantize.py") == 2
    err = capsys.readouterr().err.strip()
    assert "LSQ with per-channel activations is not supported" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------ distillation
def test_distillation_loss_is_the_formula_and_the_teacher_stays_outside() -> None:
    torch.manual_seed(0)
    student, teacher = build_model("resnet20", 3, 10), _bn_model()
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    z = student.eval()(x)
    t = teacher(x)
    for w, temp in ((1.0, 1.0), (0.3, 4.0)):
        lit = LitClassifier(student, 10, teacher=teacher, distill_weight=w, distill_temperature=temp)
        # KL(p_t || p_s) = sum p_t (log p_t - log p_s), averaged over the batch, by hand
        p_t = torch.softmax(t / temp, 1)
        kl = (p_t * (torch.log(p_t) - torch.log_softmax(z / temp, 1))).sum(1).mean()
        expected = (1 - w) * torch.nn.functional.cross_entropy(z, y) + w * temp ** 2 * kl
        assert lit.training_loss(z, x, y).item() == pytest.approx(expected.item(), rel=1e-5)
    # weight 0 is plain cross-entropy; no teacher is cross-entropy
    assert LitClassifier(student, 10, teacher=teacher, distill_weight=0.0).training_loss(z, x, y).item() == \
        pytest.approx(torch.nn.functional.cross_entropy(z, y).item(), rel=1e-6)
    # a student equal to its teacher has zero distillation loss (and zero gradient through it)
    twin = LitClassifier(copy.deepcopy(teacher), 10, teacher=teacher)
    assert twin.training_loss(twin(x), x, y).item() == pytest.approx(0.0, abs=1e-6)
    # the teacher is not part of the student's state dict, parameters or train mode, and stays frozen
    lit = LitClassifier(student, 10, teacher=teacher)
    lit.train()
    assert not any(k.startswith("_teacher") or "teacher" in k for k in lit.state_dict())
    assert {id(p) for p in lit.parameters()} == {id(p) for p in student.parameters()}
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="distill_weight"):
        LitClassifier(student, 10, teacher=teacher, distill_weight=1.5)


def test_distillation_teacher_takes_half_inputs_in_fp32() -> None:
    """O2 / O3 hand the student bf16 images; the fp32 teacher gets them in its own dtype."""
    student = build_model("resnet20", 3, 10).eval().to(torch.bfloat16)
    teacher = _bn_model()
    lit = LitClassifier(student, 10, teacher=teacher)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    loss = lit.training_loss(student(x.bfloat16()).float(), x.bfloat16(), y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("freeze_bn_epoch", [None, 0])
def test_qat_fit_trains_batch_norm_until_frozen(freeze_bn_epoch: int | None) -> None:
    """The fp32 model arrives in eval mode (as from a checkpoint) and Lightning keeps module modes at fit
    start: the callback must switch to train mode, so BatchNorm statistics move unless frozen."""
    pl.seed_everything(0, verbose=False)
    dm = ClassificationDataModule("fake", image_size=8, batch_size=16, fake_size=64, augment=False)
    dm.calib_batches = 2
    plan = QuantPlan.from_bits(8, 8, act_observer="ema")
    lit = LitClassifier(prepare(_bn_model(), plan, qat=True), 10, lr=0.01, scheduler="none")
    layers = [m for m in lit.model.modules() if isinstance(m, QuantConvBn2d)]
    assert layers and not any(m.training for m in layers)
    before = [m.bn.running_mean.clone() for m in layers]
    modes: list[bool] = []

    class Mode(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            modes.append(all(m.training for m in pl_module.modules()))

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, max_epochs=1, inference_mode=False,
                         callbacks=[PTQCalibration(), QATCallback(plan, freeze_bn_epoch=freeze_bn_epoch), Mode()])
    trainer.predict(lit, datamodule=dm, return_predictions=False)
    trainer.fit(lit, datamodule=dm)
    assert modes and all(modes)
    moved = [not torch.equal(m.bn.running_mean, b) for m, b in zip(layers, before, strict=True)]
    assert all(moved) if freeze_bn_epoch is None else not any(moved)


def test_builtin_qat_follows_the_same_freeze_schedule() -> None:
    """torch.ao's QAT model through the real Trainer with BuiltinQATSchedule (freeze at epoch 1 of 2): its
    BatchNorm statistics and observer ranges move in epoch 0 only, and validation never moves a range."""
    pl.seed_everything(0, verbose=False)
    dm = ClassificationDataModule("fake", image_size=8, batch_size=16, fake_size=64, augment=False)
    prepared = builtin_qat_prepare(_bn_model(), available_backends()[0], torch.randn(2, 3, 8, 8))
    lit = LitClassifier(prepared, 10, lr=0.01, scheduler="none")
    bns = [m for m in prepared.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    observers = [m.activation_post_process for m in prepared.modules() if isinstance(m, FakeQuantizeBase)]
    assert bns and observers

    def snapshot() -> list[torch.Tensor]:
        return [t.clone() for t in [b.running_mean for b in bns] + [o.min_val for o in observers]]

    seen: dict[str, list[torch.Tensor]] = {"start": snapshot()}

    class Record(pl.Callback):
        def on_validation_start(self, trainer, pl_module) -> None:
            seen[f"val_start{trainer.current_epoch}"] = snapshot()

        def on_validation_end(self, trainer, pl_module) -> None:
            seen[f"val_end{trainer.current_epoch}"] = snapshot()

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, max_epochs=2, inference_mode=False,
                         num_sanity_val_steps=0, callbacks=[BuiltinQATSchedule(1, 1), Record()])
    trainer.fit(lit, datamodule=dm)
    n = len(bns)

    def same(a: str, b: str) -> list[bool]:
        return [torch.equal(x, y) for x, y in zip(seen[a], seen[b], strict=True)]

    assert not any(same("start", "val_start0")[:n])  # epoch 0: every BatchNorm trains
    assert not all(same("start", "val_start0")[n:])  # ...and the observers move
    assert all(same("val_start0", "val_end0"))  # validation moves nothing
    assert all(same("val_end0", "val_start1"))  # epoch 1: BatchNorm and observers frozen


@pytest.mark.parametrize("name,bits", [("float-control", 16), ("input4-control", 4)])
def test_control_plans_quantize_only_the_input(name: str, bits: int) -> None:
    from train import __file__ as train_file

    plan = QuantPlan.from_yaml(Path(train_file).parent / "configs" / "plans" / f"{name}.yaml")
    model, x = _bn_model(), torch.rand(8, 3, 8, 8)
    q = prepare(model, plan, qat=True)
    assert [n for n, _ in iter_quantizers(q)] == ["input_quant"] and q.input_quant.spec.bits == bits
    calibrate(q, [x])
    with torch.no_grad():  # the folded float model, fed the input quantizer's image
        assert torch.allclose(q.eval()(x), model.eval()(q.input_quant(x)), atol=1e-4)
        moved = float((q.input_quant(x) - x).abs().max())
    assert moved < 1e-4 if bits == 16 else moved > 1e-2  # 16 bits: below the data's step; 4: 16 levels
