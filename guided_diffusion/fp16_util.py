"""Half-precision helpers and mixed-precision training with dynamic loss scaling.

``convert_module_to_f16`` / ``convert_module_to_f32`` switch the weights of convolutions
(the bulk of the UNet's compute) between float32 and a half dtype, as the original
``--use_fp16`` does; normalisation layers stay in float32 and compute in float32.

``MixedPrecisionTrainer`` implements the original fp16 training scheme: the model holds
fp16 trunk weights, the optimizer updates float32 *master* copies of every parameter
(flattened into one tensor per group), and the loss is multiplied by ``2**lg_loss_scale``
before the backward pass. A step whose gradient norm is not finite is skipped and the scale
halved (``lg_loss_scale -= 1``); every good step grows it by ``fp16_scale_growth``.
Without fp16 the master parameters are the model's own parameters.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from . import logger

INITIAL_LOG_LOSS_SCALE = 20.0

# One group: the (name, parameter) pairs flattened together, and the master tensor's shape.
ParamGroup = Tuple[List[Tuple[str, torch.Tensor]], Tuple[int, ...]]


def convert_module_to_f16(l: nn.Module, dtype: torch.dtype = torch.float16) -> None:  # noqa: E741
    """Cast the weights of a convolution ``l`` to half precision (fp16 by default, or bf16);
    guided-diffusion's parameter name, for ``model.apply``."""
    if isinstance(l, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        l.weight.data = l.weight.data.to(dtype)
        if l.bias is not None:
            l.bias.data = l.bias.data.to(dtype)


def convert_module_to_f32(l: nn.Module) -> None:  # noqa: E741
    """Cast the weights of a convolution ``l`` back to float32 (undoes
    ``convert_module_to_f16``)."""
    if isinstance(l, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        l.weight.data = l.weight.data.float()
        if l.bias is not None:
            l.bias.data = l.bias.data.float()


# ----------------------------------------------------------------- master-parameter helpers


def get_param_groups_and_shapes(
    named_model_params: Sequence[Tuple[str, torch.Tensor]],
) -> List[ParamGroup]:
    """Split parameters into the two groups of the original: scalars/vectors and matrices.

    :return: ``[(scalar_and_vector_params, (-1,)), (matrix_params, (1, -1))]``; each master
        tensor is the flat concatenation of its group, viewed with that shape.
    """
    named = list(named_model_params)
    scalar_vector = [(n, p) for n, p in named if p.ndim <= 1]
    matrix = [(n, p) for n, p in named if p.ndim > 1]
    return [(scalar_vector, (-1,)), (matrix, (1, -1))]


def _flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors in their logical (row-major) order into one float32 vector."""
    if not tensors:
        return torch.zeros(0)
    return torch.cat([t.detach().float().reshape(-1) for t in tensors])


def make_master_params(param_groups_and_shapes: Sequence[ParamGroup]) -> List[nn.Parameter]:
    """One float32 master ``nn.Parameter`` per group: the group's values, flattened."""
    master_params = []
    for params, shape in param_groups_and_shapes:
        flat = _flatten([p for _, p in params]).view(shape)
        master_params.append(nn.Parameter(flat, requires_grad=True))
    return master_params


def param_grad_or_zeros(param: torch.Tensor) -> torch.Tensor:
    """The gradient of ``param`` (detached), or zeros of its shape when it has none."""
    if param.grad is not None:
        return param.grad.detach()
    return torch.zeros_like(param)


def model_grads_to_master_grads(
    param_groups_and_shapes: Sequence[ParamGroup], master_params: Sequence[nn.Parameter]
) -> None:
    """Copy the model's (half-precision) gradients into the float32 master gradients."""
    for master, (params, shape) in zip(master_params, param_groups_and_shapes):
        master.grad = _flatten([param_grad_or_zeros(p) for _, p in params]).view(shape)


def unflatten_master_params(
    param_group: Sequence[Tuple[str, torch.Tensor]], master_param: torch.Tensor
) -> List[torch.Tensor]:
    """Views of a flat master tensor with the shapes of the group's parameters."""
    sizes = [p.numel() for _, p in param_group]
    pieces = torch.split(master_param.reshape(-1), sizes)
    return [piece.view(p.shape) for piece, (_, p) in zip(pieces, param_group)]


def master_params_to_model_params(
    param_groups_and_shapes: Sequence[ParamGroup], master_params: Sequence[torch.Tensor]
) -> None:
    """Copy the master values into the model's parameters (casting to their dtype)."""
    for master, (params, _) in zip(master_params, param_groups_and_shapes):
        for (_, param), value in zip(params, unflatten_master_params(params, master)):
            param.detach().copy_(value)


def master_params_to_state_dict(
    model: nn.Module,
    param_groups_and_shapes: Optional[Sequence[ParamGroup]],
    master_params: Sequence[torch.Tensor],
    use_fp16: bool,
) -> Dict[str, torch.Tensor]:
    """A state dict of ``model`` whose parameters are the (float32) master values.

    Keys are the model's own (the official checkpoint names); buffers come from the model.
    """
    state_dict = model.state_dict()
    if use_fp16:
        for master, (params, _) in zip(master_params, param_groups_and_shapes):
            for (name, _), value in zip(params, unflatten_master_params(params, master)):
                assert name in state_dict, name
                state_dict[name] = value
    else:
        for (name, _), value in zip(model.named_parameters(), master_params):
            assert name in state_dict, name
            state_dict[name] = value
    return state_dict


def state_dict_to_master_params(
    model: nn.Module, state_dict: Dict[str, torch.Tensor], use_fp16: bool
) -> List[torch.Tensor]:
    """Master tensors (flattened groups under fp16) holding the values of ``state_dict``."""
    named = [(name, state_dict[name]) for name, _ in model.named_parameters()]
    if use_fp16:
        return make_master_params(get_param_groups_and_shapes(named))
    return [value for _, value in named]


def zero_master_grads(master_params: Sequence[torch.Tensor]) -> None:
    """Drop the master gradients."""
    for param in master_params:
        param.grad = None


def zero_grad(model_params: Sequence[torch.Tensor]) -> None:
    """Drop the gradients of the model's parameters (``set_to_none`` semantics)."""
    for param in model_params:
        param.grad = None


def check_overflow(value: float) -> bool:
    """Whether a (gradient-norm) value is inf or NaN."""
    return not np.isfinite(value)


def _global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all tensors together, as a float32 device scalar (no host sync)."""
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm([t.detach().float() for t in tensors])
    return torch.linalg.vector_norm(torch.stack(norms))


class MixedPrecisionTrainer:
    """Gradient bookkeeping of one model: fp32, or fp16 with master params and loss scaling.

    Use: ``zero_grad()``, ``backward(loss)`` for every microbatch, then ``optimize(opt)``
    where ``opt`` was built over ``master_params``. After ``optimize`` returned True,
    ``grad_norm`` and ``param_norm`` hold that step's norms as device scalars.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        use_fp16: bool = False,
        fp16_scale_growth: float = 1e-3,
        initial_lg_loss_scale: float = INITIAL_LOG_LOSS_SCALE,
    ) -> None:
        self.model = model
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self.model_params = list(model.parameters())
        self.master_params: List[torch.Tensor] = list(self.model_params)
        self.param_groups_and_shapes: Optional[List[ParamGroup]] = None
        self.lg_loss_scale = initial_lg_loss_scale
        self.grad_norm: Optional[torch.Tensor] = None
        self.param_norm: Optional[torch.Tensor] = None
        if use_fp16:
            self.param_groups_and_shapes = get_param_groups_and_shapes(
                list(model.named_parameters())
            )
            self.master_params = make_master_params(self.param_groups_and_shapes)
            model.convert_to_fp16()

    def zero_grad(self) -> None:
        zero_grad(self.model_params)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of ``loss`` (scaled by ``2**lg_loss_scale`` under fp16)."""
        if self.use_fp16:
            (loss * 2**self.lg_loss_scale).backward()
        else:
            loss.backward()

    def optimize(self, opt: torch.optim.Optimizer) -> bool:
        """Take an optimizer step; False when fp16 overflowed and the step was skipped."""
        if self.use_fp16:
            return self._optimize_fp16(opt)
        return self._optimize_normal(opt)

    def _optimize_fp16(self, opt: torch.optim.Optimizer) -> bool:
        model_grads_to_master_grads(self.param_groups_and_shapes, self.master_params)
        scale = 2**self.lg_loss_scale
        grad_norm = _global_norm([p.grad for p in self.master_params]) / scale
        if check_overflow(grad_norm.item()):  # host sync: the skip decision needs the value
            self.lg_loss_scale -= 1
            logger.log(
                f"found a non-finite gradient; lg_loss_scale lowered to {self.lg_loss_scale}"
            )
            zero_master_grads(self.master_params)
            return False
        self.grad_norm = grad_norm
        self.param_norm = _global_norm(self.master_params)
        torch._foreach_mul_([p.grad for p in self.master_params], 1.0 / scale)
        opt.step()
        zero_master_grads(self.master_params)
        master_params_to_model_params(self.param_groups_and_shapes, self.master_params)
        self.lg_loss_scale += self.fp16_scale_growth
        return True

    def _optimize_normal(self, opt: torch.optim.Optimizer) -> bool:
        self.grad_norm = _global_norm([p.grad for p in self.master_params if p.grad is not None])
        self.param_norm = _global_norm(self.master_params)
        opt.step()
        return True

    def master_params_to_state_dict(
        self, master_params: Sequence[torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """A state dict of the model (official key names) holding these master values."""
        return master_params_to_state_dict(
            self.model, self.param_groups_and_shapes, master_params, self.use_fp16
        )

    def state_dict_to_master_params(self, state_dict: Dict[str, torch.Tensor]) -> List:
        """Master tensors laid out like ``master_params``, holding the values of ``state_dict``."""
        return state_dict_to_master_params(self.model, state_dict, self.use_fp16)
