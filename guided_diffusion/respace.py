"""Sampling with fewer steps than training: respaced diffusion processes."""

from __future__ import annotations

from typing import Iterable, Sequence, Union

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts: Union[str, Sequence[int]]) -> set:
    """The original timesteps to keep when respacing a ``num_timesteps``-step process.

    ``section_counts`` is a list of step counts, one per equal section of the process
    (``"10,15,20"``: 10 steps in the first third, ...), a single count (``"100"``), or
    ``"ddimN"``: the evenly strided steps ``range(0, num_timesteps, stride)`` of the DDIM
    paper, which must give exactly N steps.

    Raises ``ValueError`` with the reason for a string that cannot be honoured.
    """
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            try:
                desired_count = int(text[len("ddim") :])
            except ValueError:
                raise ValueError(
                    f"invalid timestep_respacing {section_counts!r}: expected ddimN, e.g. ddim50"
                ) from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"invalid timestep_respacing {section_counts!r}: no integer stride gives exactly "
                f"{desired_count} of {num_timesteps} steps"
            )
        try:
            section_counts = [int(x) for x in text.split(",")]
        except ValueError:
            raise ValueError(
                f"invalid timestep_respacing {section_counts!r}: expected a step count (100), "
                "comma-separated counts per section (10,15,20) or ddimN"
            ) from None
    section_counts = list(section_counts)
    if not section_counts or any(c < 1 for c in section_counts):
        raise ValueError(f"invalid timestep_respacing {section_counts!r}: counts must be >= 1")
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(
                f"invalid timestep_respacing: cannot take {section_count} steps from a section "
                f"of {size} (of {num_timesteps} diffusion steps)"
            )
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion process that keeps only ``use_timesteps`` of a base process.

    Step index i of this process is original timestep ``timestep_map[i]``; the model (and the
    classifier of ``cond_fn``) is called with the original timestep. Epsilon Scaling is
    indexed by i, the step of this respaced process. ``original_alphas_cumprod`` and
    ``original_timesteps`` keep the base schedule (the time-shift sampler searches it).

    :param use_timesteps: the original timesteps to keep.
    :param kwargs: the arguments of the base ``GaussianDiffusion``.
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.timestep_map: list[int] = []
        self.original_num_steps = len(kwargs["betas"])
        base = GaussianDiffusion(
            **{k: v for k, v in kwargs.items() if k not in ("eps_scaler", "eps_scaler_k")}
        )
        last_alpha_cumprod = 1.0
        new_betas = []
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)
        self.original_alphas_cumprod = base.alphas_cumprod
        self.original_timesteps = np.array(self.timestep_map, dtype=np.int64)

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(
            model, self.timestep_map, self.rescale_timesteps, self.original_num_steps
        )

    def _scale_timesteps(self, t):
        return t  # the wrapper maps (and rescales) timesteps


class _WrappedModel:
    """Calls ``model`` with the original timestep ``timestep_map[i]`` of each respaced step
    index i (scaled to [0, 1000) with ``rescale_timesteps``); guided-diffusion's signature.
    The map is copied to each device once."""

    def __init__(self, model, timestep_map, rescale_timesteps, original_num_steps):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps
        self._maps: dict = {}

    def __call__(self, x, ts, **kwargs):
        map_tensor = self._maps.get(ts.device)
        if map_tensor is None:
            map_tensor = torch.tensor(self.timestep_map, device=ts.device, dtype=torch.long)
            self._maps[ts.device] = map_tensor
        new_ts = map_tensor[ts]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)
