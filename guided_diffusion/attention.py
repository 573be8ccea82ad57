"""Attention in the ADM UNet: the multi-head QKV kernels (both head layouts of the official
checkpoints), the self-attention block, CLIP-style attention pooling, the attention
implementation switch (``auto``/``sdpa``/``einsum``) and the FLOP counter for ``thop``.

``unet`` re-exports every name here (downstream code imports them from ``unet``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import checkpoint, conv_nd, normalization, zero_module

# "auto": fused scaled_dot_product_attention on GPUs; on CPUs the reference math as batched
# matmuls over chunks of heads (SDPA's CPU kernels measured 1.5-3x slower for ADM's head size
# 32; benchmarks/sample_throughput.py)
ATTENTION_IMPLS = ("auto", "sdpa", "einsum")

# On CPUs, heads are attended in chunks whose (T, S) float32 weights take at most this many
# bytes, so q^T k, the softmax and the weighted sum of a chunk stay in the L2 cache (measured
# 2.5x faster than one batched product for 16x16 maps at batch 64, no effect on small maps)
CPU_ATTENTION_CHUNK_BYTES = 4 << 20


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str) -> torch.Tensor:
    """softmax(q^T k / sqrt(ch)) applied to v, for (B*H, ch, T) tensors; returns (B*H, ch, T).

    ``sdpa`` uses ``scaled_dot_product_attention`` (fused kernels); ``einsum`` is the
    original's formulation (q and k each scaled by ch^-1/4, softmax in float32); ``auto``
    takes ``sdpa`` on GPUs and, elsewhere, ``einsum``'s arithmetic (bit for bit) as two
    batched matmuls over chunks of at most ``CPU_ATTENTION_CHUNK_BYTES`` of weights.
    """
    if impl == "auto":
        if q.is_cuda:
            impl = "sdpa"
        else:
            per_head = q.shape[2] * k.shape[2] * 4
            n = max(1, CPU_ATTENTION_CHUNK_BYTES // per_head)
            if n >= q.shape[0]:
                return _attend_bmm(q, k, v)
            chunks = [
                _attend_bmm(q[i : i + n], k[i : i + n], v[i : i + n])
                for i in range(0, q.shape[0], n)
            ]
            return torch.cat(chunks)
    if impl == "sdpa":
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )  # (B*H, T, ch)
        return out.transpose(1, 2)
    scale = 1 / math.sqrt(math.sqrt(q.shape[1]))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)  # (B*H, T, S)
    weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v)


def _attend_bmm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The einsum reference as two batched matmuls, bit for bit: q and k each scaled by
    ch^-1/4 as the original does (scaling q alone by ch^-1/2 rounds differently, and
    classifier-guided DDIM at the noisiest cosine steps amplifies that to 1e-4 relative in
    the samples; issue 21), softmax in float32."""
    scale = 1 / math.sqrt(math.sqrt(q.shape[1]))
    weight = torch.bmm((q * scale).transpose(1, 2), k * scale)  # (B*H, T, S)
    weight = torch.softmax(weight.float(), dim=-1).to(v.dtype)
    return torch.bmm(v, weight.transpose(1, 2))  # (B*H, ch, T)


def count_flops_attn(model: nn.Module, _x, y) -> None:
    """A counter of an attention operation's FLOPs for the ``thop`` package (as the original).

    Use: ``thop.profile(model, inputs=(x, t), custom_ops={QKVAttention:
    QKVAttention.count_flops})``. thop calls it as a forward hook ``(module, inputs, output)``;
    the count is taken from ``y[0]`` exactly as guided-diffusion does, so FLOP tables match
    the original's: with ``b, c, *spatial = y[0].shape``, two matmuls of
    ``b * num_spatial**2 * c`` ops.
    """
    b, c, *spatial = y[0].shape
    num_spatial = math.prod(spatial)
    # two matmuls of the same size: the weights (q^T k) and the weighted sum of v
    matmul_ops = 2 * b * (num_spatial**2) * c
    model.total_ops += torch.DoubleTensor([matmul_ops])


class _QKVAttention(nn.Module):
    """Multi-head attention on a (N, 3*H*C, T) qkv tensor; subclasses say how it splits."""

    def __init__(self, n_heads: int, impl: str = "auto"):
        super().__init__()
        self.n_heads = n_heads
        self.impl = impl

    def _split(self, qkv: torch.Tensor, ch: int) -> tuple[torch.Tensor, ...]:
        """q, k, v, each (N*H, C, T)."""
        raise NotImplementedError

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """(N, 3*H*C, T) -> (N, H*C, T)."""
        bs, width, length = qkv.shape
        assert width % (3 * self.n_heads) == 0
        q, k, v = self._split(qkv, width // (3 * self.n_heads))
        return _attend(q, k, v, self.impl).reshape(bs, -1, length)

    @staticmethod
    def count_flops(model: nn.Module, _x, y) -> None:
        """thop counter of this operation (``count_flops_attn``)."""
        count_flops_attn(model, _x, y)


class QKVAttentionLegacy(_QKVAttention):
    """Multi-head attention on qkv laid out per head as (q, k, v) (the older checkpoints)."""

    def _split(self, qkv: torch.Tensor, ch: int) -> tuple[torch.Tensor, ...]:
        bs, _, length = qkv.shape
        return qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)


class QKVAttention(_QKVAttention):
    """Multi-head attention on qkv laid out as (all q, all k, all v) (new attention order)."""

    def _split(self, qkv: torch.Tensor, ch: int) -> tuple[torch.Tensor, ...]:
        bs, _, length = qkv.shape
        return tuple(t.reshape(bs * self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))


class AttentionBlock(nn.Module):
    """Self-attention over the spatial positions of a feature map, with a residual."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
        attention_impl: str = "auto",
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"channels {channels} not divisible by num_head_channels {num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        attn_cls = QKVAttention if use_new_attention_order else QKVAttentionLegacy
        self.attention = attn_cls(self.num_heads, attention_impl)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        h = self.proj_out(self.attention(self.qkv(self.norm(x.reshape(b, c, -1)))))  # (N, C, T)
        # the residual in x's own memory layout: a channels-last map stays channels-last
        # (the sum of the flattened views loses it at batch 1, and GroupNorm then copies)
        return x + h.reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the mean token attends to all positions."""

    def __init__(
        self,
        spacial_dim: int,
        embed_dim: int,
        num_heads_channels: int,
        output_dim: Optional[int] = None,
        attention_impl: str = "auto",
    ):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5
        )
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads, attention_impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *_ = x.shape
        x = x.reshape(b, c, -1)  # (N, C, HW)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)  # (N, C, HW+1)
        x = x + self.positional_embedding[None].to(x.dtype)
        x = self.c_proj(self.attention(self.qkv_proj(x)))
        return x[:, :, 0]


def _parse_attention_impl(attention_impl: str) -> str:
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
    return attention_impl


def set_attention_impl(model: nn.Module, impl: str) -> nn.Module:
    """Switch every attention layer of ``model`` to ``auto``, ``sdpa`` or ``einsum`` (the
    original's computation); no weights change."""
    impl = _parse_attention_impl(impl)
    for m in model.modules():
        if isinstance(m, _QKVAttention):
            m.impl = impl
    return model
