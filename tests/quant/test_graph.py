"""The traced graph: functional ops quantized like modules, attention decomposed, clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_quant.quant import QuantConfigError, QuantPlan, calibrate, enable_fake_quant, iter_quantizers, prepare, trace
from lit_quant.quant.attention import DecomposedMultiheadAttention
from lit_quant.quant.layers import QuantConv2d, QuantOutput
from lit_quant.quant.ops import Add, Cat, MatMul, Mean
from lit_quant.quant.summary import summarize


class FunctionalNet(nn.Module):
    """A user's model: functional ReLU, `out = out + identity`, `torch.cat`, functional pooling and a
    shape computed from `x.shape`; `unused` is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 10)
        self.unused = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = F.relu(self.bn1(self.conv1(x)))
        out = self.conv2(identity)
        out = out + identity
        out = F.relu(out)
        out = F.relu(self.conv3(torch.cat([out, identity], dim=1)))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.fc(out.reshape(x.shape[0], -1))


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = FunctionalNet()
    with torch.no_grad():
        net.train()(torch.randn(16, 1, 8, 8))
    return net.eval()


def test_functional_ops_become_quantized_modules_and_the_float_graph_is_exact() -> None:
    net = _net()
    q = prepare(net, QuantPlan.from_bits(8, 8))
    kinds = {name: type(m.module) for name, m in q.model.named_modules() if isinstance(m, QuantOutput)}
    # conv1 + bn1 + relu: one integer op (the relu's output quantized, the conv's not); the add absorbs
    # into the ReLU after it; cat, the second ReLU and the pooling each get their own quantizer
    assert kinds == {"relu": nn.ReLU, "relu_1": nn.ReLU, "cat": Cat, "relu_2": nn.ReLU,
                     "adaptive_avg_pool2d": nn.AdaptiveAvgPool2d}
    assert isinstance(q.model.add, Add) and q.model.conv1.act_quant is None
    assert isinstance(q.model.conv2, QuantConv2d) and q.model.conv2.act_quant is not None
    assert type(q.model.unused) is nn.Conv2d  # never called: left alone, and not an error
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        enable_fake_quant(q, False)
        assert torch.allclose(q(x), net(x), atol=1e-5)
    calibrate(q, [torch.randn(8, 1, 8, 8)])
    assert all(bool(fq.qparams_valid) for _, fq in iter_quantizers(q))
    with torch.no_grad():
        assert not torch.equal(q(x), net(x)) and torch.allclose(q(x), net(x), atol=0.1)


def test_a_module_called_twice_gets_one_copy_per_call_and_ints_stay_python() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.relu(self.conv(x))
            n, c = y.shape[0], y.shape[1]
            return self.relu(y * 2.0).reshape(n, c * y.shape[2] * y.shape[3]).mean(1)

    model = Twice()
    gm = trace(model)
    calls = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["conv", "relu", "relu_1", "mean"]  # `c * h * w` of ints is no Mul, `mean(1)` is a module
    assert isinstance(gm.mean, Mean) and gm.relu_1 is not gm.relu
    x = torch.randn(2, 1, 4, 4)
    assert torch.equal(gm(x), model(x))


@pytest.mark.parametrize("batch_first", [True, False])
def test_decomposed_attention_equals_multihead_attention(batch_first: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    dec = DecomposedMultiheadAttention.from_float(mha).eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        out, weights = mha(x, x, x)
        out_d, weights_d = dec(x, x, x)
    assert torch.allclose(out, out_d, atol=1e-6) and torch.allclose(weights, weights_d, atol=1e-6)
    if batch_first:
        pad = torch.zeros(3, 5, dtype=torch.bool)
        pad[:, -2:] = True
        with torch.no_grad():
            assert torch.allclose(mha(x, x, x, key_padding_mask=pad)[0], dec(x, x, x, key_padding_mask=pad)[0],
                                  atol=1e-6)


def test_attention_projections_products_and_softmax_are_quantized() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.norm = nn.LayerNorm(16)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, _ = self.attn(x, x, x, need_weights=False)
            return self.head(self.norm(x + y)[:, 0])

    torch.manual_seed(0)
    model = Encoder().eval()
    q = prepare(model, QuantPlan.from_bits(8, 8))
    wrapped = {name: type(m.module) for name, m in q.model.named_modules() if isinstance(m, QuantOutput)}
    assert {"attn.matmul_qk": MatMul, "attn.softmax": nn.Softmax, "attn.matmul_av": MatMul, "add": Add,
            "norm": nn.LayerNorm}.items() <= wrapped.items()
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        layer = q.model.get_submodule(f"attn.{proj}")
        assert layer.weight_quant is not None and layer.act_quant is not None
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        enable_fake_quant(q, False)
        assert torch.allclose(q(x), model(x), atol=1e-5)
        calibrate(q, [x])
        assert torch.allclose(q(x), model(x), atol=0.05)


def test_untraceable_model_names_the_line_and_what_to_do() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return self.conv(x)
            return -self.conv(x)

    with pytest.raises(QuantConfigError) as err:
        prepare(Branchy())
    message = str(err.value)
    assert "\n" not in message and "test_graph.py" in message and "if x.sum() > 0" in message
    assert "leaf_types" in message


def test_leaf_types_keep_an_untraceable_block_float() -> None:
    class Branch(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    model = nn.Sequential(nn.Conv2d(1, 2, 3), Branch(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).eval()
    q = prepare(model, leaf_types=(Branch,))
    assert isinstance(q.model.get_submodule("1"), Branch)
    calibrate(q, [torch.randn(2, 1, 8, 8)])
    # what stays float is listed as float; flatten keeps its input's grid and is not an op of its own
    assert [(op.name, op.op, op.weight_bits, op.act_bits, op.status) for op in summarize(q)] == [
        ("input", "input", None, 8, "quantized"), ("0", "Conv2d", 8, 8, "quantized"),
        ("1", "Branch", None, None, "float"), ("3", "Linear", 8, 8, "quantized")]


def test_model_with_nothing_to_quantize_is_an_error() -> None:
    class Nothing(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)

    with pytest.raises(QuantConfigError, match="nothing to quantize"):
        prepare(Nothing())


def test_a_subclass_of_a_table_module_with_its_own_forward_is_traced_through() -> None:
    """torchvision's ConvNeXt normalizes channels-first with a LayerNorm subclass that permutes around
    ``F.layer_norm``: the trace enters it, so the permutes stay in the graph around a plain LayerNorm."""

    class ChannelsFirstNorm(nn.LayerNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.permute(0, 2, 3, 1)
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.norm = ChannelsFirstNorm(4)
            self.fc = nn.Linear(4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.norm(self.conv(x)).mean((2, 3)))

    net = Net().eval()
    q = prepare(net, QuantPlan.from_bits(8, 8))
    wrapped = {name: type(m.module) for name, m in q.model.named_modules() if isinstance(m, QuantOutput)}
    assert wrapped["norm.layer_norm"] is nn.LayerNorm and ChannelsFirstNorm not in wrapped.values()
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        assert torch.allclose(q(x), net(x), atol=1e-5)  # observers only: the float function, permutes included
