"""torch.ao reference (lit_quant.app.torchao_ref) and size / latency measurement (lit_quant.app.measure), on
real torch.ao."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lit_quant.deploy.engines import available_backends, use_engine
from lit_quant.deploy.graph import ExportError
from lit_quant.deploy.options import BACKENDS
from lit_quant.errors import UserError
from lit_quant.app.measure import latency_ms, model_size_bytes
from lit_quant.app.models import build_model
from lit_quant.app.torchao_ref import (
    HalfPrecision,
    builtin_dynamic,
    builtin_half,
    builtin_ptq,
    builtin_qat_convert,
    builtin_qat_prepare,
)

AVAILABLE = available_backends()


class TinyCNN(nn.Module):
    """conv-bn-relu x2, pool, fc: enough weights (about 19k) that int8 storage dominates the file size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(self.flatten(self.pool(x)))


class Untraceable(TinyCNN):
    """TinyCNN with data-dependent control flow, which FX symbolic tracing rejects."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:  # a Proxy cannot be turned into a bool; a (quantized) tensor can
            raise ValueError("expected NCHW images")
        return super().forward(x)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyCNN()
    # Non-trivial BatchNorm statistics, so folding BN into the conv is actually exercised.
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8))
    return model.eval()


def _batches(n: int = 3, size: int = 8, shape: tuple[int, ...] = (1, 8, 8), seed: int = 1) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def _quantized_modules(model: nn.Module) -> list[nn.Module]:
    # By module path rather than isinstance, so the tests need no torch.ao import of their own.
    return [m for m in model.modules() if type(m).__module__.startswith(("torch.ao.nn.quantized",
                                                                        "torch.ao.nn.intrinsic.quantized"))]


def test_available_backends_are_known_and_include_x86_kernels() -> None:
    assert AVAILABLE, "no quantized engine runs on this CPU"
    assert set(AVAILABLE) <= set(BACKENDS)
    assert set(AVAILABLE) <= set(torch.backends.quantized.supported_engines)
    assert available_backends() == AVAILABLE  # cached and stable
    available_backends().append("bogus")
    assert "bogus" not in available_backends()  # callers get a copy, not the cache


@pytest.mark.parametrize("backend", AVAILABLE)
# torch.load of quantized tensors goes through torch's own deprecated TypedStorage path.
@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")
def test_ptq_every_backend_quantizes_and_matches_float(backend: str) -> None:
    model = _model()
    batches = _batches()
    engine_before = torch.backends.quantized.engine
    result = builtin_ptq(model, batches, backend, batches[0][0])
    assert torch.backends.quantized.engine == engine_before  # restored
    assert (result.backend, result.method) == (backend, "fx")
    assert result.calib_s > 0
    quantized = _quantized_modules(result.model)
    convs = [m for m in quantized if type(m).__name__ in ("Conv2d", "ConvReLU2d")]
    assert len(convs) == 2  # conv-bn-relu fused and quantized
    assert all(c.weight().dtype == torch.qint8 for c in convs)
    assert any(type(m).__name__ == "Linear" for m in quantized)
    x = _batches(1, 32, seed=7)[0][0]
    with torch.no_grad():
        y_float, y_int8 = model(x), result.model(x)
    assert y_int8.dtype == torch.float32 and y_int8.shape == (32, 10)
    assert _cosine(y_float, y_int8) > 0.99
    assert model_size_bytes(result.model) < 0.35 * model_size_bytes(model)
    # The int8 state dict survives a save / load round trip (packed params unpack, serialize and re-pack).
    buffer = io.BytesIO()
    torch.save(result.model.state_dict(), buffer)
    buffer.seek(0)
    reloaded = copy.deepcopy(result.model)
    with use_engine(backend):
        reloaded.load_state_dict(torch.load(buffer))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), y_int8, atol=0, rtol=0)


def test_ptq_fx_on_resnet20_and_caller_model_unchanged() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _batches(1, 8)
    result = builtin_ptq(model, batches, AVAILABLE[0], batches[0][0])
    assert result.method == "fx" and result.fx_error is None
    assert len([m for m in _quantized_modules(result.model) if "Conv" in type(m).__name__]) == 21
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert not model.training
    assert all(type(m).__module__.startswith("torch.nn") or type(m).__module__.startswith("lit_quant")
               for m in model.modules())
    x = _batches(1, 8, seed=3)[0][0]
    with torch.no_grad():
        assert _cosine(model(x), result.model(x)) > 0.99


def test_ptq_falls_back_to_eager_when_fx_cannot_trace() -> None:
    torch.manual_seed(0)
    model = Untraceable().eval()
    batches = _batches()
    result = builtin_ptq(model, batches, AVAILABLE[0], batches[0][0])
    assert result.method == "eager"
    assert result.fx_error and "TraceError" in result.fx_error
    assert _quantized_modules(result.model)
    x = _batches(1, 16, seed=3)[0][0]
    with torch.no_grad():
        assert _cosine(model(x), result.model(x)) > 0.99
    with pytest.raises(UserError, match="FX graph mode cannot trace"):
        builtin_ptq(model, batches, AVAILABLE[0], batches[0][0], method="fx")


def test_ptq_forced_eager_on_torchvision_quantizable_model() -> None:
    torch.manual_seed(0)
    # ImageNet stem (stride 2 + max-pool): 32x32 inputs are 8x8 after it, which keeps the test cheap.
    model = torchvision.models.get_model("quantized_resnet18", quantize=False, weights=None, num_classes=10).eval()
    batches = _batches(2, 4, shape=(3, 32, 32))
    result = builtin_ptq(model, batches, AVAILABLE[0], batches[0][0], method="eager")
    assert result.method == "eager"
    # fuse_model() folded every BatchNorm; the model's own QuantStub was used (no extra wrapper).
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    assert type(result.model).__name__ == "QuantizableResNet"
    assert len([m for m in _quantized_modules(result.model) if "Conv" in type(m).__name__]) == 20
    x = _batches(1, 4, shape=(3, 32, 32), seed=3)[0][0]
    with torch.no_grad():
        assert _cosine(model(x), result.model(x)) > 0.98
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # caller's model not fused


def test_unknown_backend_and_method_are_one_line_errors() -> None:
    model = _model()
    batches = _batches(1)
    with pytest.raises(ExportError, match="unknown quantized backend 'tensorrt'") as err:
        builtin_ptq(model, batches, "tensorrt", batches[0][0])
    assert all(b in str(err.value) for b in AVAILABLE) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="choose from auto, fx, eager"):
        builtin_ptq(model, batches, AVAILABLE[0], batches[0][0], method="graph")
    with pytest.raises(UserError, match="no calibration batches"):
        builtin_ptq(model, [], AVAILABLE[0], batches[0][0])
    with pytest.raises(ExportError):
        builtin_qat_prepare(model, "tensorrt", batches[0][0])


def test_dynamic_quantizes_linear_layers_only() -> None:
    model = _model()
    dynamic = builtin_dynamic(model)
    assert type(dynamic.fc).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert dynamic.fc.weight().dtype == torch.qint8
    assert isinstance(dynamic.conv1, nn.Conv2d)  # convolutions stay float
    assert isinstance(model.fc, nn.Linear) and type(model.fc) is nn.Linear  # caller's model unchanged
    x = _batches(1, 16)[0][0]
    with torch.no_grad():
        assert _cosine(model(x), dynamic(x)) > 0.999


def test_half_copy_is_16_bit_and_close_to_float() -> None:
    model = _model()
    x = _batches(1, 16)[0][0]
    half = builtin_half(model, x)
    assert isinstance(half, HalfPrecision) and half.dtype in (torch.float16, torch.bfloat16)
    assert all(p.dtype == half.dtype for p in half.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        y_float, y_half = model(x), half(x)
    assert y_half.dtype == torch.float32
    assert _cosine(y_float, y_half) > 0.999
    torch.testing.assert_close(y_half, y_float, atol=0.05, rtol=0.05)
    assert model_size_bytes(half) < 0.6 * model_size_bytes(model)
    forced = builtin_half(model, dtype=torch.bfloat16)
    assert forced.dtype == torch.bfloat16
    with torch.no_grad():
        assert _cosine(y_float, forced(x)) > 0.99


def test_qat_prepare_train_convert() -> None:
    model = _model().train()
    batches = _batches(2, 16)
    backend = AVAILABLE[0]
    prepared = builtin_qat_prepare(model, backend, batches[0][0])
    assert prepared.training
    assert any("FakeQuantize" in type(m).__name__ for m in prepared.modules())
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01, momentum=0.9)
    weight_before = model.conv1.weight.detach().clone()
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(prepared(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert torch.equal(model.conv1.weight, weight_before)  # training the copy left the caller's model alone
    quantized = builtin_qat_convert(prepared)
    assert not quantized.training
    convs = [m for m in _quantized_modules(quantized) if "Conv" in type(m).__name__]
    assert len(convs) == 2 and all(c.weight().dtype == torch.qint8 for c in convs)
    x = _batches(1, 16, seed=9)[0][0]
    prepared.eval()
    with torch.no_grad():
        # The int8 model computes what the fake-quantized one simulated.
        assert _cosine(prepared(x), quantized(x)) > 0.99
    assert model_size_bytes(quantized) < 0.35 * model_size_bytes(model)
    with pytest.raises(UserError, match="builtin_qat_prepare"):
        builtin_qat_convert(_model())


def test_measure_latency_and_size() -> None:
    model = _model()
    batches = _batches(2)
    quantized = builtin_ptq(model, batches, AVAILABLE[0], batches[0][0]).model
    x = batches[0][0][:1]
    threads = torch.get_num_threads()
    for m in (model, quantized):
        ms = latency_ms(m, x, warmup=1, repeats=3, threads=1)
        assert isinstance(ms, float) and ms > 0
    assert torch.get_num_threads() == threads  # restored
    assert 0 < model_size_bytes(quantized) < model_size_bytes(model)
    # The float size is the parameters and buffers at 4 bytes each plus a small pickle overhead.
    raw = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert raw < model_size_bytes(model) < raw + 20_000
    with pytest.raises(ValueError):
        latency_ms(model, x, repeats=0)
