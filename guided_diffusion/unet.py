"""The ADM UNet (Dhariwal & Nichol 2021), its super-resolution variant and the noisy-image
classifier (half a UNet).

Module names and ``nn.Sequential`` orders are a public API: they are the state_dict keys of
the official checkpoints, so they must never change.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import (  # noqa: F401  (re-exported: the original's names live in unet)
    ATTENTION_IMPLS,
    AttentionBlock,
    AttentionPool2d,
    QKVAttention,
    QKVAttentionLegacy,
    _parse_attention_impl,
    count_flops_attn,
    set_attention_impl,
)
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


@dataclass(frozen=True)
class _Blocks:
    """The settings that every residual and attention block of one network shares."""

    time_embed_dim: int
    dropout: float
    dims: int
    use_checkpoint: bool
    use_scale_shift_norm: bool
    num_head_channels: int
    use_new_attention_order: bool
    attention_impl: str
    conv_resample: bool
    resblock_updown: bool

    def res(self, ch: int, out_channels: Optional[int] = None, **updown: bool) -> ResBlock:
        return ResBlock(
            ch,
            self.time_embed_dim,
            self.dropout,
            out_channels=out_channels,
            dims=self.dims,
            use_checkpoint=self.use_checkpoint,
            use_scale_shift_norm=self.use_scale_shift_norm,
            **updown,
        )

    def attn(self, ch: int, num_heads: int) -> AttentionBlock:
        return AttentionBlock(
            ch,
            use_checkpoint=self.use_checkpoint,
            num_heads=num_heads,
            num_head_channels=self.num_head_channels,
            use_new_attention_order=self.use_new_attention_order,
            attention_impl=self.attention_impl,
        )

    def down(self, ch: int) -> nn.Module:
        if self.resblock_updown:
            return self.res(ch, ch, down=True)
        return Downsample(ch, self.conv_resample, dims=self.dims, out_channels=ch)

    def up(self, ch: int) -> nn.Module:
        if self.resblock_updown:
            return self.res(ch, ch, up=True)
        return Upsample(ch, self.conv_resample, dims=self.dims, out_channels=ch)


# the constructor arguments both networks keep as attributes (as the original does)
_CONFIG_ATTRS = (
    "image_size in_channels model_channels out_channels num_res_blocks attention_resolutions "
    "dropout channel_mult conv_resample num_classes null_class use_checkpoint num_heads "
    "num_head_channels num_heads_upsample"
).split()


class _Trunk(nn.Module):
    """What the UNet and the classifier share: their configuration attributes, the timestep
    embedding, the encoder (``input_blocks``, ``middle_block``) and fp16/bf16 conversion."""

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

    def _build_trunk(self, config: dict) -> tuple[_Blocks, list[int], int, int]:
        """Store the configuration, build the timestep embedding and the encoder (``config``
        is the constructor's ``locals()``); returns the block factory and ``_build_encoder``'s
        skip channels, final channel count and downsampling factor."""
        if config["num_heads_upsample"] == -1:
            config["num_heads_upsample"] = config["num_heads"]
        for name in _CONFIG_ATTRS:
            if name in config:
                setattr(self, name, config[name])
        self.dtype = torch.float32
        model_channels = config["model_channels"]
        blocks = _Blocks(
            time_embed_dim=model_channels * 4,
            attention_impl=_parse_attention_impl(config["attention_impl"]),
            **{
                k: config[k]
                for k in "dropout dims use_checkpoint use_scale_shift_norm num_head_channels "
                "use_new_attention_order conv_resample resblock_updown".split()
            },
        )
        self.time_embed = nn.Sequential(
            linear(model_channels, blocks.time_embed_dim),
            nn.SiLU(),
            linear(blocks.time_embed_dim, blocks.time_embed_dim),
        )
        if config.get("num_classes") is not None:  # before the encoder: the state_dict order
            n_labels = config["num_classes"] + int(config["null_class"])
            self.label_emb = nn.Embedding(n_labels, blocks.time_embed_dim)
        return (blocks, *self._build_encoder(blocks))

    def _build_encoder(self, blocks: _Blocks) -> tuple[list[int], int, int]:
        """Build ``input_blocks`` and ``middle_block``; returns the skip connections' channel
        counts, the final channel count and the final downsampling factor."""
        ch = int(self.channel_mult[0] * self.model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(blocks.dims, self.in_channels, ch, 3, padding=1))]
        )
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers: list[nn.Module] = [blocks.res(ch, int(mult * self.model_channels))]
                ch = int(mult * self.model_channels)
                if ds in self.attention_resolutions:
                    layers.append(blocks.attn(ch, self.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(blocks.down(ch)))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            blocks.res(ch), blocks.attn(ch, self.num_heads), blocks.res(ch)
        )
        return skip_chans, ch, ds


class UNetModel(_Trunk):
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
        check_image_size(image_size, channel_mult)
        if null_class and num_classes is None:
            raise ValueError("null_class needs a class-conditional model (num_classes)")
        blocks, skip_chans, ch, ds = self._build_trunk(locals())
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers: list[nn.Module] = [
                    blocks.res(ch + skip_chans.pop(), int(model_channels * mult))
                ]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(blocks.attn(ch, self.num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(blocks.up(ch))
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


class EncoderUNetModel(_Trunk):
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
        if pool == "attention":  # the pooling's positional embedding has the final map's size
            check_image_size(image_size, channel_mult)
        _, skip_chans, ch, ds = self._build_trunk(locals())
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
