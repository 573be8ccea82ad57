"""The ADM UNet (Dhariwal & Nichol 2021), its super-resolution variant and the noisy-image
classifier (half a UNet).

Module names and ``nn.Sequential`` orders are a public API: they are the state_dict keys of
the official checkpoints, so they must never change.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fp16_util import convert_module_to_f16, convert_module_to_f32
from .nn import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)

# "auto": fused scaled_dot_product_attention on GPUs; on CPUs the reference math as batched
# matmuls over chunks of heads (SDPA's CPU kernels measured 1.5-3x slower for ADM's head size
# 32; benchmarks/sample_throughput.py)
ATTENTION_IMPLS = ("auto", "sdpa", "einsum")

# On CPUs, heads are attended in chunks whose (T, S) float32 weights take at most this many
# bytes, so q^T k, the softmax and the weighted sum of a chunk stay in the L2 cache (measured
# 2.5x faster than one batched product for 16x16 maps at batch 64, no effect on small maps)
CPU_ATTENTION_CHUNK_BYTES = 4 << 20


class TimestepBlock(nn.Module):
    """A module whose ``forward`` takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor: ...


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential container that passes the timestep embedding to children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.channels
        if self.dims == 3:  # upsample the inner two dimensions only
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution or by average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            assert self.channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """A residual block conditioned on the timestep embedding.

    ``use_scale_shift_norm`` applies the embedding as FiLM (``norm(h) * (1 + scale) + shift``);
    ``up``/``down`` resample inside the block (BigGAN-style, ``--resblock_updown``).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: Optional[int] = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(
                emb_channels,
                2 * self.out_channels if use_scale_shift_norm else self.out_channels,
            ),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = self.h_upd(in_rest(x))
            x = self.x_upd(x)
            h = in_conv(h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.ndim - 2)))  # (N, C, 1, 1)
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return _pointwise(self.skip_connection, x) + h


def _pointwise(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; a 1x1 convolution of a channels-last map as a matmul over its channels.

    A channels-last (N, C, H, W) tensor is an (N, H, W, C) array in memory, so the matmul
    reads and writes it in place, where torch's small-batch 1x1 convolution path would copy
    it to the contiguous layout and back (measured 3% of a 64x64 UNet pass at batch 1).
    """
    if (
        isinstance(layer, nn.Conv2d)
        and layer.kernel_size == (1, 1)
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        out = F.linear(x.permute(0, 2, 3, 1), layer.weight.flatten(1), layer.bias)  # (N, H, W, C')
        return out.permute(0, 3, 1, 2)
    return layer(x)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str) -> torch.Tensor:
    """softmax(q^T k / sqrt(ch)) applied to v, for (B*H, ch, T) tensors; returns (B*H, ch, T).

    ``sdpa`` uses ``scaled_dot_product_attention`` (fused kernels); ``einsum`` is the
    original's formulation (q and k each scaled by ch^-1/4, softmax in float32); ``auto``
    takes ``sdpa`` on GPUs and, elsewhere, the same math as two batched matmuls over chunks
    of at most ``CPU_ATTENTION_CHUNK_BYTES`` of weights.
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
    """The einsum reference as two batched matmuls (q scaled by ch^-1/2, softmax in float32)."""
    weight = torch.bmm((q * (1 / math.sqrt(q.shape[1]))).transpose(1, 2), k)  # (B*H, T, S)
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


class QKVAttentionLegacy(nn.Module):
    """Multi-head attention on qkv laid out per head as (q, k, v) (the older checkpoints)."""

    def __init__(self, n_heads: int, impl: str = "auto"):
        super().__init__()
        self.n_heads = n_heads
        self.impl = impl

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """(N, H*3*C, T) -> (N, H*C, T)."""
        bs, width, length = qkv.shape
        assert width % (3 * self.n_heads) == 0
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        return _attend(q, k, v, self.impl).reshape(bs, -1, length)

    @staticmethod
    def count_flops(model: nn.Module, _x, y) -> None:
        """thop counter of this operation (``count_flops_attn``)."""
        count_flops_attn(model, _x, y)


class QKVAttention(nn.Module):
    """Multi-head attention on qkv laid out as (all q, all k, all v) (new attention order)."""

    def __init__(self, n_heads: int, impl: str = "auto"):
        super().__init__()
        self.n_heads = n_heads
        self.impl = impl

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """(N, 3*H*C, T) -> (N, H*C, T)."""
        bs, width, length = qkv.shape
        assert width % (3 * self.n_heads) == 0
        ch = width // (3 * self.n_heads)
        q, k, v = (
            t.reshape(bs * self.n_heads, ch, length) for t in qkv.chunk(3, dim=1)
        )  # each (N*H, C, T)
        return _attend(q, k, v, self.impl).reshape(bs, -1, length)

    @staticmethod
    def count_flops(model: nn.Module, _x, y) -> None:
        """thop counter of this operation (``count_flops_attn``)."""
        count_flops_attn(model, _x, y)


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


def check_image_size(image_size: int, channel_mult: Sequence[float]) -> None:
    """Refuse an image size the resolution levels cannot halve down and double back up.

    Each of the ``len(channel_mult) - 1`` downsamplings halves the map and the decoder
    concatenates the skip of the same level, so the size must divide by 2^(levels - 1).
    """
    factor = 2 ** (len(channel_mult) - 1)
    if image_size % factor:
        mult = ",".join(str(m) for m in channel_mult)
        raise ValueError(
            f"--image_size {image_size} is not divisible by {factor} ({len(channel_mult)} "
            f"resolution levels of channel_mult {mult}): use a multiple of {factor} such as "
            f"{max(factor, image_size // factor * factor)}"
        )


def set_attention_impl(model: nn.Module, impl: str) -> nn.Module:
    """Switch every attention layer of ``model`` to ``auto``, ``sdpa`` or ``einsum`` (the
    original's computation); no weights change."""
    impl = _parse_attention_impl(impl)
    for m in model.modules():
        if isinstance(m, (QKVAttention, QKVAttentionLegacy)):
            m.impl = impl
    return model


class _HalfPrecisionMixin:
    """``convert_to_fp16`` / ``convert_to_fp32`` for the trunk of a (half) UNet."""

    def _trunk(self) -> list[nn.Module]:
        return [self.input_blocks, self.middle_block]

    def convert_to_fp16(self, dtype: torch.dtype = torch.float16) -> None:
        """Run the trunk in half precision (fp16 by default; pass torch.bfloat16 for bf16)."""
        for part in self._trunk():
            part.apply(lambda m: convert_module_to_f16(m, dtype))
        self.dtype = dtype

    def convert_to_fp32(self) -> None:
        """Run the trunk in float32 again."""
        for part in self._trunk():
            part.apply(convert_module_to_f32)
        self.dtype = torch.float32


def _build_encoder(
    self,
    *,
    model_channels: int,
    time_embed_dim: int,
    in_channels: int,
    num_res_blocks: int,
    attention_resolutions: Sequence[int],
    dropout: float,
    channel_mult: Sequence[int],
    conv_resample: bool,
    dims: int,
    use_checkpoint: bool,
    num_heads: int,
    num_head_channels: int,
    use_scale_shift_norm: bool,
    resblock_updown: bool,
    use_new_attention_order: bool,
    attention_impl: str,
) -> tuple[list[int], int, int]:
    """Build ``input_blocks`` and ``middle_block`` (shared by UNetModel and EncoderUNetModel).

    Returns the channel counts of the skip connections, the final channel count and the
    final downsampling factor.
    """
    ch = int(channel_mult[0] * model_channels)
    self.input_blocks = nn.ModuleList(
        [TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))]
    )
    skip_chans = [ch]
    ds = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers: list[nn.Module] = [
                ResBlock(
                    ch,
                    time_embed_dim,
                    dropout,
                    out_channels=int(mult * model_channels),
                    dims=dims,
                    use_checkpoint=use_checkpoint,
                    use_scale_shift_norm=use_scale_shift_norm,
                )
            ]
            ch = int(mult * model_channels)
            if ds in attention_resolutions:
                layers.append(
                    AttentionBlock(
                        ch,
                        use_checkpoint=use_checkpoint,
                        num_heads=num_heads,
                        num_head_channels=num_head_channels,
                        use_new_attention_order=use_new_attention_order,
                        attention_impl=attention_impl,
                    )
                )
            self.input_blocks.append(TimestepEmbedSequential(*layers))
            skip_chans.append(ch)
        if level != len(channel_mult) - 1:
            if resblock_updown:
                down: nn.Module = ResBlock(
                    ch,
                    time_embed_dim,
                    dropout,
                    out_channels=ch,
                    dims=dims,
                    use_checkpoint=use_checkpoint,
                    use_scale_shift_norm=use_scale_shift_norm,
                    down=True,
                )
            else:
                down = Downsample(ch, conv_resample, dims=dims, out_channels=ch)
            self.input_blocks.append(TimestepEmbedSequential(down))
            skip_chans.append(ch)
            ds *= 2

    def res(c: int) -> ResBlock:
        return ResBlock(
            c,
            time_embed_dim,
            dropout,
            dims=dims,
            use_checkpoint=use_checkpoint,
            use_scale_shift_norm=use_scale_shift_norm,
        )

    self.middle_block = TimestepEmbedSequential(
        res(ch),
        AttentionBlock(
            ch,
            use_checkpoint=use_checkpoint,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            use_new_attention_order=use_new_attention_order,
            attention_impl=attention_impl,
        ),
        res(ch),
    )
    return skip_chans, ch, ds


class UNetModel(_HalfPrecisionMixin, nn.Module):
    """The ADM UNet with timestep embedding, optional class embedding and attention.

    :param in_channels: channels of the input tensor.
    :param model_channels: base channel count (``--num_channels``).
    :param out_channels: channels of the output (6 when the variance is learned).
    :param num_res_blocks: residual blocks per resolution.
    :param attention_resolutions: downsampling factors (1, 2, 4, ...) that get attention.
    :param channel_mult: channel multiplier per resolution.
    :param num_classes: if set, the model is class-conditional with this many classes.
    :param null_class: add the label ``num_classes`` ("no label"), one more embedding row,
        for classifier-free guidance (``--class_dropout_prob``).
    :param use_fp16: run the trunk in float16.
    :param num_heads / num_head_channels: attention heads (a fixed channel width per head
        overrides the head count when ``num_head_channels != -1``).
    :param num_heads_upsample: heads in the upsampling path (-1: same as ``num_heads``).
    :param attention_impl: ``auto`` (default: ``sdpa`` on GPUs, batched matmuls on CPUs),
        ``sdpa`` (fused) or ``einsum`` (reference math).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: Optional[int] = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        attention_impl: str = "auto",
        null_class: bool = False,
    ):
        super().__init__()
        attention_impl = _parse_attention_impl(attention_impl)
        check_image_size(image_size, channel_mult)
        if null_class and num_classes is None:
            raise ValueError("null_class needs a class-conditional model (num_classes)")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.null_class = null_class
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes + int(null_class), time_embed_dim)

        skip_chans, ch, ds = _build_encoder(
            self,
            model_channels=model_channels,
            time_embed_dim=time_embed_dim,
            in_channels=in_channels,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            dropout=dropout,
            channel_mult=channel_mult,
            conv_resample=conv_resample,
            dims=dims,
            use_checkpoint=use_checkpoint,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order,
            attention_impl=attention_impl,
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                skip = skip_chans.pop()
                layers: list[nn.Module] = [
                    ResBlock(
                        ch + skip,
                        time_embed_dim,
                        dropout,
                        out_channels=int(model_channels * mult),
                        dims=dims,
                        use_checkpoint=use_checkpoint,
                        use_scale_shift_norm=use_scale_shift_norm,
                    )
                ]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(
                        AttentionBlock(
                            ch,
                            use_checkpoint=use_checkpoint,
                            num_heads=num_heads_upsample,
                            num_head_channels=num_head_channels,
                            use_new_attention_order=use_new_attention_order,
                            attention_impl=attention_impl,
                        )
                    )
                if level and i == num_res_blocks:
                    if resblock_updown:
                        up: nn.Module = ResBlock(
                            ch,
                            time_embed_dim,
                            dropout,
                            out_channels=ch,
                            dims=dims,
                            use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm,
                            up=True,
                        )
                    else:
                        up = Upsample(ch, conv_resample, dims=dims, out_channels=ch)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(
                conv_nd(dims, int(model_channels * channel_mult[0]), out_channels, 3, padding=1)
            ),
        )
        if use_fp16:
            self.convert_to_fp16()

    def _trunk(self) -> list[nn.Module]:
        return [self.input_blocks, self.middle_block, self.output_blocks]

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """(N, C, H, W) images, (N,) timesteps, optional (N,) labels -> (N, out_channels, H, W)."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(
                "class labels y must be given if and only if the model is class-conditional"
            )
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        hs = []
        h = x.to(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.to(x.dtype))


class SuperResModel(UNetModel):
    """A UNet conditioned on a low-resolution image, upsampled and concatenated to the input."""

    def __init__(self, image_size: int, in_channels: int, *args, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)

    def forward(self, x, timesteps, low_res=None, **kwargs):  # type: ignore[override]
        _, _, new_height, new_width = x.shape
        upsampled = F.interpolate(low_res, (new_height, new_width), mode="bilinear")
        return super().forward(torch.cat([x, upsampled], dim=1), timesteps, **kwargs)


class EncoderUNetModel(_HalfPrecisionMixin, nn.Module):
    """The encoder half of the UNet with a pooling head: the noisy-image classifier.

    ``pool`` is one of ``adaptive``, ``attention``, ``spatial``, ``spatial_v2``.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
        attention_impl: str = "auto",
    ):
        super().__init__()
        attention_impl = _parse_attention_impl(attention_impl)
        if pool == "attention":  # the pooling's positional embedding has the final map's size
            check_image_size(image_size, channel_mult)
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )
        skip_chans, ch, ds = _build_encoder(
            self,
            model_channels=model_channels,
            time_embed_dim=time_embed_dim,
            in_channels=in_channels,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            dropout=dropout,
            channel_mult=channel_mult,
            conv_resample=conv_resample,
            dims=dims,
            use_checkpoint=use_checkpoint,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order,
            attention_impl=attention_impl,
        )
        # spatial pooling concatenates the mean of every input block and the middle block
        self._feature_size = sum(skip_chans) + ch
        self.pool = pool
        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(dims, ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            if num_head_channels == -1:
                raise ValueError("attention pooling needs num_head_channels")
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                AttentionPool2d(
                    image_size // ds, ch, num_head_channels, out_channels, attention_impl
                ),
            )
        elif pool == "spatial":
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                nn.ReLU(),
                nn.Linear(2048, out_channels),
            )
        elif pool == "spatial_v2":
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048),
                normalization(2048),
                nn.SiLU(),
                nn.Linear(2048, out_channels),
            )
        else:
            raise ValueError(f"unknown pool {pool!r}: use adaptive, attention, spatial, spatial_v2")

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images and (N,) timesteps -> (N, out_channels) logits."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        spatial = self.pool.startswith("spatial")
        results = []
        h = x.to(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            if spatial:
                results.append(h.to(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            results.append(h.to(x.dtype).mean(dim=(2, 3)))
            return self.out(torch.cat(results, dim=-1))
        return self.out(h.to(x.dtype))
