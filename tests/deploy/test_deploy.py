"""Deployment: real int8 models from our qparams, the integer-only engine, the packed deploy file, the CLI.

Models are the ``trained`` fixture's ResNet-20 (3 epochs on 8x8 synthetic images), calibrated with our PTQ;
every comparison is against our own fake-quant model on the same images, and int8 rows run torch.ao's
real quantized kernels.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import report_rows, run_script

from lit_quant.app.config import TrainConfig
from lit_quant.deploy.graph import ExportError, agreement, deploy_graph
from lit_quant.deploy.int8 import cpu_has_vnni, export_int8, int8_blockers, reduce_range_note
from lit_quant.deploy.integer import IntegerEngine, fixed_point, mul_shift_round, shift_round
from lit_quant.deploy.pack import load_deployed, pack, save_deployed, unpack
from lit_quant.app.measure import model_size_bytes
from lit_quant.quant import QuantPlan, calibrate, prepare
from lit_quant.quant.layers import QuantOutput, QuantWeightLayer
from lit_quant.app.training import Arch, build_datamodule, load_classifier, model_from_arch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(trained: Path) -> dict:
    """The trained float model, its calibration batches and 256 test-sized inputs."""
    classifier = load_classifier(trained / "tiny" / "best.ckpt")
    arch = classifier.hparams.arch
    dm = build_datamodule(TrainConfig(data="fake", fake_size=256, image_size=8, model="resnet20", batch_size=64,
                                      progress=False))
    dm.setup()
    batches = [x for x, _ in dm.train_dataloader()]
    return {"model": classifier.model.eval(), "arch": arch, "calib": batches[:2], "x": torch.cat(batches)[:256]}


def _ptq(setup: dict, weight_bits: int, act_bits: int, **kw) -> torch.nn.Module:
    qmodel = prepare(setup["model"], QuantPlan.from_bits(weight_bits, act_bits, act_observer="mse", **kw))
    calibrate(qmodel, setup["calib"])
    return qmodel.eval()


def _out_step(qmodel: torch.nn.Module) -> float:
    return float(qmodel.model.fc.act_quant.scale)


# --- int8 kernels with our qparams ------------------------------------------------------------------------
@pytest.mark.parametrize("backend,weight_bits", [("qnnpack", 8), ("x86", 7), ("fbgemm", 7), ("x86", 4)])
def test_int8_export_matches_fake_quant(setup: dict, backend: str, weight_bits: int) -> None:
    """Real torch.ao kernels fed our integers, biases and qparams compute what our fake-quant model computes:
    same predictions, logits within one output step (rounding ties). 7-bit weights keep fbgemm's int16 pair
    sums exact on CPUs without VNNI."""
    qmodel = _ptq(setup, weight_bits, 8, io_bits=8)  # quantized logits: a step to measure them in
    int8 = export_int8(qmodel, backend)
    x = setup["x"]
    with torch.no_grad():
        ours, fake = int8(x), qmodel(x)
    assert (ours.argmax(1) == fake.argmax(1)).float().mean() >= 0.99
    assert (ours - fake).abs().max() <= 1.01 * _out_step(qmodel)
    size = model_size_bytes(int8) / model_size_bytes(setup["model"])
    assert size <= 0.3, size
    # real quantized modules, not float ones
    assert any(type(m).__module__.startswith("torch.ao.nn") for m in int8.modules())


def test_float_logits_deploy_as_the_last_accumulator(setup: dict) -> None:
    """The default plan's float logits: the int8 modules and the integer engine dequantize the last layer's
    int32 accumulator, so they compute the fake-quant model's logits up to float32 rounding and the rare
    one-step ties upstream."""
    qmodel = _ptq(setup, 7, 8)
    assert qmodel.model.fc.act_quant is None
    x = setup["x"]
    for deployed in (export_int8(qmodel, "x86"), IntegerEngine(qmodel)):
        check = agreement(deployed, qmodel, [x])
        assert check["max_logit_diff_steps"] is None
        assert check["disagree"] <= 0.01 * len(x), check
        assert check["max_logit_diff_share"] <= 0.01, check


def test_reduce_range_said_not_hidden(setup: dict) -> None:
    """8-bit weights on fbgemm / x86: the saturation caveat is reported exactly when this CPU lacks VNNI;
    7-bit weights and qnnpack never get it."""
    q8 = _ptq(setup, 8, 8)
    assert (reduce_range_note(q8, "x86") is not None) == (not cpu_has_vnni())
    assert reduce_range_note(q8, "qnnpack") is None
    assert reduce_range_note(_ptq(setup, 7, 8), "fbgemm") is None


def test_int8_refuses_what_kernels_cannot_hold(setup: dict) -> None:
    q44 = _ptq(setup, 4, 4)
    assert any("4-bit activations" in b for b in int8_blockers(q44))
    with pytest.raises(ExportError, match="8-bit activations"):
        export_int8(q44, "x86")
    with pytest.raises(ExportError, match="no quantizers"):
        deploy_graph(prepare(setup["model"], QuantPlan.from_bits(None, None)))
    with pytest.raises(ExportError, match="float"):
        deploy_graph(_ptq(setup, 8, 8, skip=("fc",)))


# --- integer-only engine -------------------------------------------------------------------------------------
def test_fixed_point_multiplier() -> None:
    m = torch.tensor([1e-4, 0.0123, 0.5, 0.99999, 3.7, 1000.0], dtype=torch.float64)
    for bits in (8, 16, 31):
        m0, n = fixed_point(m, bits)
        assert ((m0 >= 2 ** (bits - 1)) & (m0 < 2 ** bits)).all()
        approx = m0.double() / torch.pow(2.0, n.double())
        assert ((approx - m).abs() / m).max() <= 2.0 ** -(bits - 1)
    x = torch.arange(-40, 41)
    n = torch.full_like(x, 3)
    assert torch.equal(shift_round(x, n), torch.floor(x / 8 + 0.5).long())  # ties toward +inf
    assert torch.equal(shift_round(x, torch.full_like(x, -2)), x * 4)


def test_mul_shift_round_is_exact_past_64_bit_products() -> None:
    """``round(x M0 / 2^n)`` for 64-bit accumulators times Q31 multipliers, whose products pass int64,
    against Python's unbounded integers; products that fit take the direct path and agree as well."""
    g = torch.Generator().manual_seed(0)
    for x_bits in (20, 46):  # 20: x M0 fits int64; 46: it does not (the 16-bit model's case)
        x = torch.randint(-2 ** x_bits, 2 ** x_bits + 1, (3000,), generator=g)
        m0 = torch.randint(2 ** 30, 2 ** 31, (3000,), generator=g)
        n = torch.randint(16, 62, (3000,), generator=g)
        x[0], n[0] = -2 ** x_bits, 61  # the extremes
        expected = [(a * b + (1 << (k - 1))) >> k for a, b, k in zip(x.tolist(), m0.tolist(), n.tolist())]
        assert mul_shift_round(x, m0, n).tolist() == expected
    with pytest.raises(ExportError, match="overflows 64 bits"):
        mul_shift_round(torch.tensor([2 ** 50]), torch.tensor([2 ** 30]), torch.tensor([40]))


def _layerwise_steps(engine: IntegerEngine, qmodel: torch.nn.Module, x: torch.Tensor) -> float:
    """Largest difference, in output steps, between each integer layer and the fake-quant module fed the
    same (dequantized) integer input: the per-layer 'within one quantization step' property."""
    env = engine.run(x)
    worst = 0.0
    for step in engine.steps:
        if step.name not in engine.out_qparams:
            continue
        inputs = [env[n].dequantize() for n in step.inputs]
        with torch.no_grad():
            if step.kind == "requant" and any(env[n].qmin is None for n in step.inputs):
                # requantizing an accumulator: run the producing layer / add in float first
                producer = next(s for s in engine.steps if s.name == step.inputs[0])
                inner = [env[n].dequantize() for n in producer.inputs]
                expected = step.module(producer.module(*inner))
            else:
                expected = step.module(*inputs)
        got = env[step.name].dequantize()
        worst = max(worst, float((got - expected).abs().max() / engine.out_qparams[step.name].scale))
    return worst


@pytest.mark.parametrize("bits", [(8, 8), (4, 4), (16, 16)])
def test_integer_engine_matches_fake_quant(setup: dict, bits: tuple[int, int]) -> None:
    qmodel = _ptq(setup, *bits, io_bits=bits[1])  # quantized logits: a step to measure them in
    engine = IntegerEngine(qmodel)
    x = setup["x"]
    # every integer layer is within one step of the float simulation of that layer on the same input (plus,
    # at 16 bits, float32's own rounding: 2^-24 of a value is 2^-8 of a 16-bit step)
    assert _layerwise_steps(engine, qmodel, x) <= 1.0 + (1e-4 if max(bits) <= 8 else 1e-2)
    # end to end: with the bias on its int32 grid in both and a Q31 multiplier the rare one-step ties do not
    # compound (a 16-bit M0 and float biases in the fake-quant model gave 2 steps at 8 bits, 10 at 4 bits);
    # a prediction may differ only where the fake-quant model's top two logits are that close
    step = _out_step(qmodel)
    with torch.no_grad():
        ints, fake = engine(x), qmodel(x)
    assert (ints - fake).abs().max() <= (1.01 if bits == (8, 8) else 2.01) * step
    if max(bits) <= 8:  # and only a few logits differ at all (at 16 bits float32's rounding in the simulation
        # decides many hidden-layer ties: a quarter of the logits are one step apart, none more than two)
        assert ((ints - fake).abs() > 0.5 * step).float().mean() <= 0.02
    top2 = fake.topk(2, dim=1).values
    flipped = ints.argmax(1) != fake.argmax(1)
    assert ((top2[:, 0] - top2[:, 1])[flipped] <= 4.01 * step).all()
    if bits == (8, 8):
        assert agreement(engine, qmodel, [x])["disagree"] <= 0.02 * len(x)
    assert engine.overflow_layers() == {}
    # integers all the way: every intermediate value is an int64 tensor inside its range
    for value in engine.run(x[:8]).values():
        assert value.q.dtype == torch.int64
        if value.qmin is not None:
            assert value.qmin <= int(value.q.min()) and int(value.q.max()) <= value.qmax


def test_accumulator_overflow_reported(setup: dict) -> None:
    qmodel = _ptq(setup, 8, 8)
    x = setup["x"][:64]
    engine = IntegerEngine(qmodel, accum_bits=12)
    engine(x)
    over = engine.overflow_layers()
    assert over and all(st.bits_needed > 12 and st.overflows > 0 for st in over.values())
    # the need measured without overflow is exact: one bit less overflows, that many does not
    full = IntegerEngine(qmodel)
    full(x)
    need = max(st.bits_needed for st in full.stats.values())
    for bits, overflows in ((need - 1, True), (need, False)):
        engine = IntegerEngine(qmodel, accum_bits=bits)
        engine(x)
        assert bool(engine.overflow_layers()) == overflows
    with pytest.raises(ExportError, match="scale-approx-bits"):
        IntegerEngine(qmodel, scale_approx_bits=40)


def test_explain_real_layer(setup: dict) -> None:
    engine = IntegerEngine(_ptq(setup, 8, 8))
    text = engine.explain("layers.0.conv1", setup["x"][:16])
    assert "K = 144" in text  # 16 input channels x 3 x 3
    for word in ("centre", "multiply", "accumulate", "bias", "requantize", "clamp", "fused ReLU"):
        assert word in text
    with pytest.raises(ExportError, match="closest: .*layers.0.conv1"):
        engine.explain("layers.0.conv", setup["x"][:1])


# --- packed deploy file ---------------------------------------------------------------------------------------
def test_pack_roundtrip() -> None:
    for bits in (2, 3, 4, 5, 8, 12, 16):
        u = torch.randint(0, 2 ** bits, (1001,))
        data = pack(u, bits)
        assert data.dtype == torch.uint8 and data.numel() == -(-1001 * (1 if bits <= 4 else 2 if bits <= 8 else 4) // 2)
        assert torch.equal(unpack(data, bits, 1001), u)


@pytest.mark.parametrize("weight_bits,limit", [(8, 0.3), (4, 0.17)])
def test_deploy_file_size_and_roundtrip(setup: dict, tmp_path: Path, weight_bits: int, limit: float) -> None:
    qmodel = _ptq(setup, weight_bits, 8)
    path = tmp_path / "model-deploy.pt"
    size = save_deployed(path, qmodel, setup["arch"])
    fp32 = model_size_bytes(setup["model"])
    assert size <= limit * fp32, (size, fp32)
    loaded, _ = load_deployed(path, lambda arch: model_from_arch(Arch.from_dict(arch, str(path))))
    x = setup["x"][:64]
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
        assert torch.equal(IntegerEngine(loaded)(x), IntegerEngine(qmodel)(x))
    path.write_bytes(b"not a model")
    with pytest.raises(ExportError, match="cannot read"):
        load_deployed(path, lambda arch: model_from_arch(Arch.from_dict(arch, str(path))))


# --- quantize.py ------------------------------------------------------------------------------------------------
def test_cli_export_rows(trained: Path) -> None:
    ckpt = trained / "tiny" / "best.ckpt"
    result = run_script("quantize.py", "--ckpt", str(ckpt), "--weight-bits", "7", "--act-bits", "8", "--export", "int8",
                        "integer", "onnx", "pt2e", "executorch", "--explain", "layers.0.conv1", "--no-latency", "--no-progress",
                        "--calib-batches", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "accumulate" in result.stdout
    rows = {r["variant"]: r for r in report_rows(trained / "tiny")}
    fake = rows["ptq"]["top1"]
    assert abs(rows["int8-export"]["top1"] - fake) <= 0.1
    assert abs(rows["integer"]["top1"] - fake) <= 1.0
    assert rows["int8-export"]["size_bytes"] > 0 and rows["integer"]["size_bytes"] > 0
    assert "predictions differ from fake-quant on" in rows["integer"]["note"]
    assert (trained / "tiny" / "ptq-w7a8-deploy.pt").is_file()
    assert (trained / "tiny" / "ptq-w7a8.onnx").is_file()
    assert "differ from PyTorch fake-quant on 0 image(s)" in rows["onnx"]["note"]
    assert abs(rows["onnx"]["top1"] - fake) <= 0.1
    assert (trained / "tiny" / "ptq-w7a8.pt2").is_file() and rows["pt2e"]["size_bytes"] > 0
    assert abs(rows["pt2e"]["top1"] - fake) <= 0.1 and "Inductor x86 int8 kernels" in rows["pt2e"]["note"]
    assert (trained / "tiny" / "ptq-w7a8.pte").is_file() and "XNNPACK delegate" in rows["executorch"]["note"]
    assert abs(rows["executorch"]["top1"] - fake) <= 0.1

    result = run_script("quantize.py", "--ckpt", str(ckpt), "--bits", "4", "--export", "int8", "integer",
                        "--accum-bits", "8", "--no-latency", "--no-progress", "--calib-batches", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r["variant"]: r for r in report_rows(trained / "tiny")}
    assert rows["int8-export"]["top1"] is None and "not expressible" in rows["int8-export"]["note"]
    assert "ACCUMULATOR OVERFLOW" in rows["integer"]["note"]
    assert "accumulator overflow" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--export", "tflite"], "invalid --export 'tflite'"),
    (["--accum-bits", "16"], "add --export integer"),
    (["--mode", "builtin", "--export", "int8"], "use --mode ptq, compare or qat"),
    (["--explain", "layers.0.conv"], "layers.0.conv1"),
    (["--export", "integer", "--scale-approx-bits", "40"], "scale-approx-bits"),
    (["--export", "onnx", "--onnx-opset", "11"], "opset 11 is too old"),
])
def test_cli_bad_export_flags(trained: Path, args: list[str], message: str) -> None:
    before = sorted(p.name for p in (trained / "tiny").iterdir())
    result = run_script("quantize.py", "--ckpt", str(trained / "tiny" / "best.ckpt"), "--no-progress", "--no-latency",
                        "--calib-batches", "1", *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(p.name for p in (trained / "tiny").iterdir()) == before  # refused before any work


def test_quant_modules_are_what_the_graph_sees(setup: dict) -> None:
    """Every quantized module of a prepared ResNet-20 appears as an exported step (nothing silently dropped)."""
    qmodel = _ptq(setup, 8, 8)
    steps = deploy_graph(qmodel)
    targets = {s.target for s in steps}
    for name, module in qmodel.model.named_modules():
        if isinstance(module, (QuantWeightLayer, QuantOutput)):
            assert name in targets, name
