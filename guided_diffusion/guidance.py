"""Guidance for sampling: classifier-free guidance and the classifier-guidance gradient.

Both plug into the one sampling loop of ``GaussianDiffusion``: classifier-free guidance
as the ``model`` (it returns the guided eps, so Epsilon Scaling, which divides the
model's eps in ``p_mean_variance``, applies after guidance), classifier guidance as the
``cond_fn``.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Union

import torch
import torch.nn.functional as F

ModelFn = Callable[..., torch.Tensor]


def has_null_class(model_or_state_dict: Union[torch.nn.Module, Mapping], num_classes: int) -> bool:
    """Whether a class-conditional UNet (or its state dict) has the null-class label
    ``num_classes`` that classifier-free guidance needs: its ``label_emb`` has
    ``num_classes + 1`` rows (trained with ``--class_dropout_prob > 0``)."""
    if isinstance(model_or_state_dict, Mapping):
        weight = model_or_state_dict.get("label_emb.weight")
    else:
        emb = getattr(model_or_state_dict, "label_emb", None)
        weight = None if emb is None else emb.weight
    return weight is not None and weight.shape[0] == num_classes + 1


def classifier_free_guidance(model: ModelFn, guidance_scale: float, null_class: int) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) as a ``model_fn(x, t, y, **kw)``:

        eps = eps_u + w (eps_c - eps_u),   eps_c = eps(x, t, y),  eps_u = eps(x, t, null)

    computed with ONE network call on the doubled batch (labels y, then ``null_class``);
    the learned-variance channels, if any, are those of the conditional half. w = 1 is the
    plain conditional model (the unconditional half is not computed).

    :param null_class: the null label, ``num_classes`` of a model with a null class (see
        ``has_null_class``).
    """
    w = float(guidance_scale)
    if not math.isfinite(w):
        raise ValueError(f"--guidance_scale must be a finite number, got {guidance_scale}")
    emb = getattr(model, "label_emb", None)
    if w != 1.0 and emb is not None and not 0 <= null_class < emb.num_embeddings:
        raise ValueError(
            f"--guidance_scale {w:g} needs a model with the null class {null_class}, but it "
            f"has {emb.num_embeddings} labels: train with --class_dropout_prob > 0, or use "
            "--guidance_scale 1"
        )

    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        if w == 1.0:
            return model(x, t, y=y, **kwargs)
        n, c = x.shape[:2]
        doubled = {k: _double(v, n) for k, v in kwargs.items()}
        y2 = torch.cat([y, torch.full_like(y, null_class)])
        out = model(torch.cat([x, x]), torch.cat([t, t]), y=y2, **doubled)  # (2N, C or 2C, ...)
        cond, uncond = out[:n], out[n:]
        eps = uncond[:, :c] + w * (cond[:, :c] - uncond[:, :c])
        return torch.cat([eps, cond[:, c:]], dim=1)

    return model_fn


def _double(v, n: int):
    """A per-sample model argument repeated for the doubled batch (others unchanged)."""
    if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n:
        return torch.cat([v, v])
    return v


def classifier_cond_fn(classifier: torch.nn.Module, classifier_scale: float) -> ModelFn:
    """Classifier guidance (Dhariwal & Nichol 2021, Algorithms 1 and 2) as a
    ``cond_fn(x, t, y)`` returning s * grad_x log softmax(classifier(x_t, t))[y].

    Raises ``ValueError`` for a scale that is not a finite number >= 0 (0 = no guidance).
    """
    scale = float(classifier_scale)
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(
            f"--classifier_scale must be a finite number >= 0, got {classifier_scale} "
            "(0 = no guidance; the paper uses 0.5 to 10)"
        )

    def cond_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor = None) -> torch.Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)  # (N, classes)
            selected = log_probs[torch.arange(len(log_probs), device=x.device), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn
