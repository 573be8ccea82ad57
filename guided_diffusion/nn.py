"""Small building blocks shared by the UNet and the diffusion code."""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _torch_checkpoint


class SiLU(nn.SiLU):
    """Kept for import compatibility; identical to ``torch.nn.SiLU``."""


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, cast back afterwards."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return F.group_norm(
            x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps
        ).to(x.dtype)


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_AVG_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def _nd(table: dict, dims: int) -> type:
    if dims not in table:
        raise ValueError(f"unsupported dimensions: {dims} (use 1, 2 or 3)")
    return table[dims]


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D, 2D or 3D convolution."""
    return _nd(_CONV, dims)(*args, **kwargs)


def linear(*args, **kwargs) -> nn.Linear:
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D, 2D or 3D average pooling."""
    return _nd(_AVG_POOL, dims)(*args, **kwargs)


@torch.no_grad()
def update_ema(
    target_params: Iterable[torch.Tensor], source_params: Iterable[torch.Tensor], rate: float = 0.99
) -> None:
    """target <- rate * target + (1 - rate) * source, in place."""
    targ, src = list(target_params), list(source_params)
    if (
        hasattr(torch, "_foreach_lerp_")
        and targ
        and all(t.dtype == s.dtype for t, s in zip(targ, src))
    ):
        torch._foreach_lerp_(targ, src, 1.0 - rate)
        return
    for t, s in zip(targ, src):
        t.mul_(rate).add_(s, alpha=1 - rate)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of a module and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Scale the parameters of a module and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def normalization(channels: int) -> nn.Module:
    """The UNet's normalisation layer: GroupNorm with 32 groups, computed in float32."""
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal timestep embeddings (Vaswani et al. 2017, as in ADM).

    :param timesteps: (N,) timesteps, may be fractional.
    :param dim: embedding size.
    :return: (N, dim) float32 tensor ``[cos(t * f_j), sin(t * f_j)]`` with
        ``f_j = max_period ** (-j / half)``, zero-padded when ``dim`` is odd.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        / half
    )
    args = timesteps[:, None].float() * freqs[None]  # (N, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def checkpoint(
    func: Callable, inputs: Sequence[torch.Tensor], params: Iterable[torch.Tensor], flag: bool
):
    """Gradient checkpointing: recompute ``func(*inputs)`` in the backward pass if ``flag``.

    ``params`` is accepted for signature compatibility; torch's checkpoint tracks them itself.
    """
    if flag and torch.is_grad_enabled():
        return _torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


class CheckpointFunction:
    """The original's checkpoint interface: ``CheckpointFunction.apply(func, n, *inputs, *params)``.

    Runs ``func`` on the first ``n`` arguments without keeping its activations and recomputes
    them in the backward pass; gradients reach the inputs and every parameter ``func`` uses
    (the trailing ``params`` are accepted for compatibility: torch's non-reentrant checkpoint
    tracks them itself, and also restores the RNG state so dropout recomputes identically).
    """

    @staticmethod
    def apply(run_function: Callable, length: int, *args: torch.Tensor):
        return _torch_checkpoint(run_function, *args[:length], use_reentrant=False)
