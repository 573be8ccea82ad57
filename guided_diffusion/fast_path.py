"""The sampling fast path: memory layout, precision and compilation of the UNet for sampling.

``optimize_for_sampling`` returns a ``SamplingModel``: the sampler calls it like the UNet,
``(x, t, **model_kwargs)``, and always gets float32 outputs in the default memory format.
The checkpoint is not touched (state_dict keys stay those of the UNet).

Defaults, chosen on a 2-core Xeon with AMX from ``benchmarks/sample_throughput.py --device
cpu`` (issue 17; the numbers are speed-ups over the plain path, the original's computation):

- attention ``auto`` (in the UNet): batched matmuls over L2-sized chunks of heads on CPUs
  (SDPA's CPU kernels are 1.5-3x slower at ADM's head size 32), SDPA on GPUs;
- channels-last memory on CPUs and GPUs: with the UNet keeping the layout through every
  layer, the default fp32 path runs at 1.0-1.2x on the bundled model and on the official
  configurations at batch 1, 8 and 64, and gives the plain path's numbers (1e-5);
- precision ``fp32``. ``bf16`` runs the trunk in bfloat16 as the original's ``--use_fp16``
  runs it in float16 (convolutions and attention in half precision; GroupNorm, the
  embeddings and the output head in float32): 1.2-2.2x on the bundled model and 2-4x on
  the official configurations on CPUs with AVX512-BF16/AMX (``cpu_supports_fast_bf16``).
  It moves the network's eps by ~3e-3 (relative) and 20-step samples by about one uint8
  level on average (tens of levels on single pixels): the size of the Epsilon Scaling
  effects this project measures, so it is opt-in;
- ``torch.compile`` is opt-in: on 2 CPU cores its first call takes 4-8 minutes for the
  bundled model (then 1.15x in fp32, 1.4x in bf16), which pays only for long runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_supports_fast_bf16() -> bool:
    """Whether this CPU has native bfloat16 dot products (AVX512-BF16 or AMX-BF16).

    Without them bf16 convolutions are emulated by oneDNN and slower than float32.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    found = [getattr(torch.cpu, name, None) for name in checks]
    if all(fn is not None for fn in found):  # cpuinfo, in torch >= 2.3
        return any(fn() for fn in found)
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return False
    flags = set(re.findall(r"\w+", cpuinfo.read_text()))
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def default_channels_last(device: torch.device) -> bool:
    """The measured default memory layout of the UNet on ``device``: channels-last."""
    return device.type in ("cpu", "cuda")


class SamplingModel:
    """The UNet as the sampler calls it: ``(x, t, **kwargs) -> float32`` model output.

    Inputs are put in the model's memory layout; the output comes back in float32 and the
    default (contiguous) layout whatever the model computes in. ``model`` is the UNet
    itself (save checkpoints from it); ``parameters()`` are its parameters, so the samplers
    find the device as they do for a bare UNet.
    """

    def __init__(self, model: nn.Module, channels_last: bool, compiled=None):
        self.model = model
        self.channels_last = channels_last
        self._fn = compiled if compiled is not None else model

    def parameters(self):
        return self.model.parameters()

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self._fn(x, timesteps, **kwargs)
        return out.to(dtype=torch.float32, memory_format=torch.contiguous_format)


def optimize_for_sampling(
    model: nn.Module,
    *,
    device: torch.device,
    channels_last: Optional[bool] = None,
    compile: bool = False,
    compile_mode: str = "default",
    precision: str = "fp32",
) -> SamplingModel:
    """Prepare a UNet (or classifier) for sampling on ``device``; returns a ``SamplingModel``.

    :param channels_last: channels-last memory for the weights and activations; ``None``
        takes ``default_channels_last(device)``. Same math, up to float rounding.
    :param compile: ``torch.compile`` the model (``dynamic=False``; slow first call).
    :param compile_mode: ``torch.compile`` mode, one of ``COMPILE_MODES``.
    :param precision: ``fp32`` leaves the weights as they are; ``bf16`` / ``fp16`` run the
        trunk in that half precision (``model.convert_to_fp16(dtype)``, the original's
        mixed-precision scheme). ``fp16`` needs a GPU; ``bf16`` is fast on GPUs and on CPUs
        where ``cpu_supports_fast_bf16()``.

    The model is converted in place (layout and, for half precision, the trunk's dtype) and
    put in eval mode; its state_dict keys do not change.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
    device = torch.device(device)
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 needs a GPU; on a CPU use bf16 or fp32")
    if precision != "fp32":
        if not hasattr(model, "convert_to_fp16"):
            raise ValueError(f"precision {precision} needs a UNet with convert_to_fp16")
        model.convert_to_fp16(HALF_DTYPES[precision])
    if channels_last is None:
        channels_last = default_channels_last(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.eval()
    compiled = torch.compile(model, mode=compile_mode, dynamic=False) if compile else None
    return SamplingModel(model, channels_last, compiled)
