"""``nn.MultiheadAttention`` written out in modules, so that each of its integer tensors gets a quantizer.

PyTorch's module runs one fused kernel: its projections, attention scores and softmax are invisible to a
trace. :class:`DecomposedMultiheadAttention` computes the same function from separate modules, the way
torch.ao's quantizable ``MultiheadAttention``, the PT2E x86 / XNNPACK quantizers and Brevitas quantize
attention:

    Q = x_q W_q^T / sqrt(d) + b_q / sqrt(d),   K = x_k W_k^T + b_k,   V = x_v W_v^T + b_v      (``q_proj`` ...)
    A = softmax(Q K^T)                     (``matmul_qk``, ``softmax``; per head, d = embed_dim / heads)
    out = (A V) W_o^T + b_o                (``matmul_av``, ``out_proj``)

The ``1 / sqrt(d)`` scaling is folded into ``q_proj`` (exact in float), so the scores need no extra op.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lit_quant.quant.ops import MatMul


class DecomposedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` from ``nn.Linear``, :class:`MatMul` and ``nn.Softmax`` modules (see the
    module docstring); build it with :meth:`from_float`. The forward signature is the original's."""

    def __init__(self, embed_dim: int, num_heads: int, kdim: int, vdim: int, bias: bool, dropout: float,
                 batch_first: bool) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim, embed_dim, bias=bias)
        self.matmul_qk = MatMul()
        self.softmax = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)
        self.matmul_av = MatMul()
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def supports(cls, mha: nn.MultiheadAttention) -> bool:
        """Whether ``mha`` uses only what this module implements (no ``bias_k`` / ``bias_v``, no zero
        attention row)."""
        return mha.bias_k is None and mha.bias_v is None and not mha.add_zero_attn

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> DecomposedMultiheadAttention:
        """The decomposed copy of ``mha`` (new parameters; ``mha`` is untouched)."""
        bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, mha.kdim, mha.vdim, bias, mha.dropout, mha.batch_first)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().chunk(3)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().chunk(3) if bias else (None, None, None)
        scaling = 1.0 / math.sqrt(new.head_dim)
        with torch.no_grad():
            for proj, w, b, s in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases, (scaling, 1.0, 1.0)):
                proj.weight.copy_(w * s)
                if b is not None:
                    proj.bias.copy_(b * s)
            new.out_proj.weight.copy_(mha.out_proj.weight.detach())
            if bias:
                new.out_proj.bias.copy_(mha.out_proj.bias.detach())
        return new.to(mha.out_proj.weight.device).train(mha.training)

    def _heads(self, x: torch.Tensor, batch: Any, length: Any) -> torch.Tensor:
        """``(B, L, E) -> (B, heads, L, d)``."""
        return x.reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, q_len, k_len = query.shape[0], query.shape[1], key.shape[1]
        q = self._heads(self.q_proj(query), batch, q_len)
        k = self._heads(self.k_proj(key), batch, k_len)
        v = self._heads(self.v_proj(value), batch, k_len)
        scores = self.matmul_qk(q, k.transpose(-2, -1))
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).triu(1)
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(batch, self.num_heads, q_len, k_len)
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        if key_padding_mask is not None:
            pad = key_padding_mask.reshape(batch, 1, 1, k_len)
            scores = scores.masked_fill(pad, float("-inf")) if pad.dtype == torch.bool else scores + pad
        attn = self.dropout(self.softmax(scores))
        out = self.matmul_av(attn, v).transpose(1, 2).reshape(batch, q_len, self.embed_dim)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, attn.mean(1) if average_attn_weights else attn


def decompose_attention(model: nn.Module) -> list[str]:
    """Replace, in place, every supported ``nn.MultiheadAttention`` of ``model`` with its
    :class:`DecomposedMultiheadAttention`; return the replaced names."""
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is nn.MultiheadAttention and DecomposedMultiheadAttention.supports(module):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    DecomposedMultiheadAttention.from_float(module))
            replaced.append(name)
    return replaced
