"""The noise schedule and the forward process of a Gaussian diffusion (Ho et al. 2020).

Beta schedules, the enums that say what the network predicts, the Epsilon Scaling
schedule lambda_i, and ``NoiseSchedule``: the float64 arrays of a schedule (alpha_bar,
the posterior q(x_{t-1} | x_t, x_0)) with q(x_t | x_0) and the x_0 / eps conversions.
``GaussianDiffusion`` (gaussian_diffusion.py) is built on it.
"""

from __future__ import annotations

import copy
import enum
import math
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """The beta schedule ``linear`` (Ho et al., scaled to the step count) or ``cosine``
    (Nichol & Dhariwal 2021, eq. 17), as float64."""
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise NotImplementedError(f"unknown beta schedule: {schedule_name!r} (use linear or cosine)")


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous ``alpha_bar(t)``, t in [0, 1], into betas capped at ``max_beta``."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas)


class ModelMeanType(enum.Enum):
    """What the network predicts."""

    PREVIOUS_X = enum.auto()  # the mean of x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """How the reverse-process variance is chosen."""

    LEARNED = enum.auto()  # the network outputs log-variance
    FIXED_SMALL = enum.auto()  # the posterior variance beta~_t
    FIXED_LARGE = enum.auto()  # beta_t
    LEARNED_RANGE = enum.auto()  # interpolation between the two, in log space


class LossType(enum.Enum):
    MSE = enum.auto()  # raw MSE (plus the VB term when the variance is learned)
    RESCALED_MSE = enum.auto()  # MSE with the VB term scaled by num_timesteps / 1000
    KL = enum.auto()  # the variational lower bound
    RESCALED_KL = enum.auto()  # the VLB times num_timesteps

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


def eps_scaler_schedule(num_steps: int, b: float = 1.0, k: float = 0.0) -> np.ndarray:
    """lambda_i = k * i + b for the sampling steps i = 0 .. num_steps - 1 (i = 0: last step).

    Raises ``ValueError`` if any lambda_i is not a positive finite number.
    """
    lam = k * np.arange(num_steps, dtype=np.float64) + b
    bad = np.flatnonzero(~(np.isfinite(lam) & (lam > 0)))
    if bad.size:
        i = int(bad[0])
        if b > 0 and k < 0 and num_steps > 1:
            bound = -b / (num_steps - 1)
            hint = f"use --eps_scaler_k > {bound:.4g} for this b, or a larger --eps_scaler"
        else:
            hint = "use --eps_scaler b > 0"
        raise ValueError(
            f"--eps_scaler {b:g} --eps_scaler_k {k:g} gives lambda_{i} = {lam[i]:g} at step {i} "
            f"of {num_steps}; lambda_i = k*i + b must be positive at every sampling step: {hint} "
            "(b = 1, k = 0 is plain ADM)"
        )
    return lam


def _broadcast(res: torch.Tensor, broadcast_shape: Sequence[int]) -> torch.Tensor:
    """Append singleton dims to ``res`` (N,) and expand it to ``broadcast_shape``."""
    return res.reshape(res.shape + (1,) * (len(broadcast_shape) - res.ndim)).expand(broadcast_shape)


def _extract_into_tensor(
    arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape: Sequence[int]
) -> torch.Tensor:
    """``arr[timesteps]`` as float32 on the device of ``timesteps``, with singleton dims
    appended and expanded to ``broadcast_shape`` (guided-diffusion's helper, same signature)."""
    res = torch.from_numpy(np.asarray(arr)).to(device=timesteps.device)[timesteps].float()
    return _broadcast(res, broadcast_shape)


def _randn(shape: Sequence[int], device, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.randn(*shape, device=device, generator=generator)


def _randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Gaussian noise like ``x`` from ``generator`` (the global generator when None)."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)


class NoiseSchedule:
    """The schedule arrays of a ``len(betas)``-step process and its forward process.

    Everything is float64 numpy, indexed by the step t of this (possibly respaced) process;
    ``_extract`` gathers per-sample values as float32 tensors.
    """

    num_timesteps: int
    model_mean_type: ModelMeanType
    rescale_timesteps: bool

    def _set_schedule(self, betas: Sequence[float]) -> None:
        """alpha_bar_t = prod_{s <= t} (1 - beta_s) and the posterior q(x_{t-1} | x_t, x_0)
        (Ho et al. 2020, eqs. 4, 6, 7), as attributes."""
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # The variance is 0 at t = 0, so its log is clipped to the value at t = 1; a one-step
        # process has no t = 1 and uses beta_0, the largest variance its only step can have.
        clip_to = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(
            np.append(clip_to, self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        # derived arrays that the samplers index (kept as attributes so they are cached once)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
        self.posterior_mean_coef2_over_coef1 = self.posterior_mean_coef2 / self.posterior_mean_coef1
        self.log_betas = np.log(betas)
        self.fixed_large_variance = np.append(clip_to, betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        # the schedule that the network was trained on (respacing replaces these)
        self.original_alphas_cumprod = self.alphas_cumprod
        self.original_timesteps = np.arange(self.num_timesteps)
        self._device_arrays: Dict[tuple, tuple] = {}

    # ------------------------------------------------------------ Epsilon Scaling

    def _set_eps_scaler(self, b: float, k: float) -> None:
        """Install the Epsilon Scaling schedule lambda_i = k * i + b (validated)."""
        eps_scale = eps_scaler_schedule(self.num_timesteps, b, k)
        scaling = bool(np.any(eps_scale != 1.0))
        if scaling and self.model_mean_type != ModelMeanType.EPSILON:
            raise ValueError(
                "Epsilon Scaling needs an eps-prediction model: use --predict_xstart False "
                "or --eps_scaler 1.0 --eps_scaler_k 0.0"
            )
        self.eps_scaler, self.eps_scaler_k = float(b), float(k)
        self.eps_scale, self._eps_scaling = eps_scale, scaling

    def with_eps_scaler(self, eps_scaler: float, eps_scaler_k: float = 0.0):
        """A copy of this process whose Epsilon Scaling schedule is lambda_i = k * i + b.

        The one way to change lambda: everything else (schedule, respacing, variance and
        mean types) is shared with this process, which is left unchanged.
        """
        new = copy.copy(self)
        new._device_arrays = dict(self._device_arrays)
        new._set_eps_scaler(eps_scaler, eps_scaler_k)
        return new

    def eps_scale_at(self, t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """lambda_i for each sample's step index ``t`` (per sample; no sync), broadcast."""
        return self._extract(self.eps_scale, t, shape)

    # ------------------------------------------------------------ helpers

    def _device_array(self, arr: np.ndarray, device: torch.device) -> torch.Tensor:
        """``arr`` (a schedule array of this process) as a tensor of its dtype on ``device``,
        copied once and cached, so sampling does no host transfers."""
        key = (id(arr), device)
        cached = self._device_arrays.get(key)
        if cached is None or cached[0] is not arr:
            if len(self._device_arrays) > 64:  # only the schedule arrays belong here
                self._device_arrays.clear()
            cached = (arr, torch.from_numpy(np.asarray(arr)).to(device))
            self._device_arrays[key] = cached
        return cached[1]

    def _extract(self, arr: np.ndarray, t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """``_extract_into_tensor`` from the cached device copy of ``arr``."""
        return _broadcast(self._device_array(arr, t.device)[t].float(), shape)

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    # ------------------------------------------------------------ forward process

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = self._extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = self._extract(self.one_minus_alphas_cumprod, t, x_start.shape)
        log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        assert noise.shape == x_start.shape
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        assert x_start.shape == x_t.shape
        mean = (
            self._extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + self._extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = self._extract(self.posterior_variance, t, x_t.shape)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # ------------------------------------------------------------ x_0, eps and x_{t-1}

    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
        """x_0 = sqrt(1 / abar_t) x_t - sqrt(1 / abar_t - 1) eps."""
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t: torch.Tensor, t: torch.Tensor, xprev: torch.Tensor):
        """Invert the posterior mean: x_0 = (x_{t-1} - coef2 x_t) / coef1."""
        return (
            self._extract(self.recip_posterior_mean_coef1, t, x_t.shape) * xprev
            - self._extract(self.posterior_mean_coef2_over_coef1, t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(
        self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor
    ) -> torch.Tensor:
        """eps = (sqrt(1 / abar_t) x_t - x_0) / sqrt(1 / abar_t - 1)."""
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)
