"""Half-precision helpers.

``convert_module_to_f16`` / ``convert_module_to_f32`` switch the weights of convolutions
(the bulk of the UNet's compute) between float32 and a half dtype, as the original
``--use_fp16`` does; normalisation layers stay in float32 and compute in float32.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def convert_module_to_f16(module: nn.Module, dtype: torch.dtype = torch.float16) -> None:
    """Cast the weights of a convolution to half precision (fp16 by default, or bf16)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.weight.data = module.weight.data.to(dtype)
        if module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)


def convert_module_to_f32(module: nn.Module) -> None:
    """Cast the weights of a convolution back to float32 (undoes ``convert_module_to_f16``)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()
