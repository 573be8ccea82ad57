"""Gaussian diffusion (Ho et al. 2020; Nichol & Dhariwal 2021) with Epsilon Scaling.

Epsilon Scaling (Ning et al., ICLR 2024, "Elucidating the Exposure Bias in Diffusion
Models"): at sampling time only, the predicted noise is divided by ``lambda_i = k * i + b``
before x_0 is predicted, where ``i`` is the index of the step in the (respaced) sampling
schedule, ``i = 0`` being the last, least noisy step::

    x0_hat = sqrt(1 / abar_i) * x_t - sqrt(1 / abar_i - 1) * eps_theta(x_t, t) / lambda_i

``b = 1, k = 0`` is plain ADM, bit for bit. Training losses never use lambda.

The sampler functions are plain tensor code: no logging, no file I/O, no host syncs.
Randomness comes from an optional ``torch.Generator`` (or an injected ``noise_fn``).
"""

from __future__ import annotations

import collections
import copy
import enum
import math
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import numpy as np
import torch

from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import mean_flat

ModelFn = Callable[..., torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]


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
        raise ValueError(
            f"eps scaler lambda_i = k*i + b must be positive at every sampling step, but "
            f"--eps_scaler {b} --eps_scaler_k {k} gives lambda_{i} = {lam[i]:g} "
            f"(of {num_steps} steps); use b > 0 (b = 1.0, k = 0.0 is plain ADM)"
        )
    return lam


class GaussianDiffusion:
    """Training and sampling utilities for a diffusion process with ``len(betas)`` steps.

    :param betas: float64 betas, one per step.
    :param model_mean_type / model_var_type / loss_type: see the enums above.
    :param rescale_timesteps: feed the network t scaled to [0, 1000).
    :param eps_scaler: b of the Epsilon Scaling schedule lambda_i = k * i + b (1.0 = off).
    :param eps_scaler_k: k of that schedule (0.0 = uniform).
    """

    def __init__(
        self,
        *,
        betas: Sequence[float],
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
        rescale_timesteps: bool = False,
        eps_scaler: float = 1.0,
        eps_scaler_k: float = 0.0,
    ):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        betas = np.array(betas, dtype=np.float64)
        self.betas = betas
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.num_timesteps = int(betas.shape[0])

        self._set_eps_scaler(eps_scaler, eps_scaler_k)

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
        # the variance is 0 at t = 0, so the log is clipped to the value at t = 1
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
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
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self._device_arrays: Dict[tuple, tuple] = {}

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

    def with_eps_scaler(self, eps_scaler: float, eps_scaler_k: float = 0.0) -> GaussianDiffusion:
        """A copy of this process whose Epsilon Scaling schedule is lambda_i = k * i + b.

        Everything else (schedule, respacing, variance and mean types) is shared.
        """
        new = copy.copy(self)
        new._device_arrays = dict(self._device_arrays)
        new._set_eps_scaler(eps_scaler, eps_scaler_k)
        return new

    # ------------------------------------------------------------------ helpers

    def _extract(self, arr: np.ndarray, t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """arr[t] as float32, reshaped to broadcast against ``shape`` (N, 1, 1, ...).

        Arrays are copied to the device once and cached, so sampling does no host transfers.
        """
        key = (id(arr), t.device)
        cached = self._device_arrays.get(key)
        if cached is None or cached[0] is not arr:
            if len(self._device_arrays) > 64:  # only the schedule arrays belong here
                self._device_arrays.clear()
            cached = (arr, torch.from_numpy(np.asarray(arr, dtype=np.float64)).to(t.device))
            self._device_arrays[key] = cached
        res = cached[1][t].float()
        return res.reshape(res.shape + (1,) * (len(shape) - res.ndim)).expand(shape)

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    def eps_scale_at(self, t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """lambda_i for each sample's step index ``t`` (per sample; no sync), broadcast."""
        return self._extract(self.eps_scale, t, shape)

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

    # ------------------------------------------------------------ reverse process

    def p_mean_variance(
        self,
        model: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        model_kwargs: Optional[dict] = None,
        use_eps_scaler: bool = True,
    ) -> Dict[str, torch.Tensor]:
        """Apply the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        With Epsilon Scaling the predicted eps is divided by lambda_t before x_0 is
        predicted (and clipped); the learned variance is untouched.

        :param t: (N,) step indices of this (possibly respaced) process.
        :param use_eps_scaler: False evaluates the unscaled model (used by the losses).
        :return: dict with ``mean``, ``variance``, ``log_variance``, ``pred_xstart`` and,
            for eps-prediction models, ``eps`` (the raw network eps, before scaling).
        """
        model_kwargs = model_kwargs or {}
        B, C = x.shape[:2]
        assert t.shape == (B,)
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            assert model_output.shape == (B, C * 2, *x.shape[2:])
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
            else:
                min_log = self._extract(self.posterior_log_variance_clipped, t, x.shape)
                max_log = self._extract(self.log_betas, t, x.shape)
                frac = (model_var_values + 1) / 2  # the output is in [-1, 1]
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            # beta_t, with the first entry set to the posterior variance for a better decoder
            model_variance = self._extract(self.fixed_large_variance, t, x.shape)
            model_log_variance = self._extract(self.fixed_large_log_variance, t, x.shape)
        else:
            model_variance = self._extract(self.posterior_variance, t, x.shape)
            model_log_variance = self._extract(self.posterior_log_variance_clipped, t, x.shape)

        def process_xstart(x0: torch.Tensor) -> torch.Tensor:
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        out: Dict[str, torch.Tensor] = {}
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x, t, model_output))
            model_mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                out["eps"] = model_output
                eps = model_output
                if use_eps_scaler and self._eps_scaling:
                    eps = eps / self.eps_scale_at(t, eps.shape)
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, eps))
            model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)

        assert model_mean.shape == model_log_variance.shape == pred_xstart.shape == x.shape
        out.update(
            mean=model_mean,
            variance=model_variance,
            log_variance=model_log_variance,
            pred_xstart=pred_xstart,
        )
        return out

    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t: torch.Tensor, t: torch.Tensor, xprev: torch.Tensor):
        return (
            self._extract(self.recip_posterior_mean_coef1, t, x_t.shape) * xprev
            - self._extract(self.posterior_mean_coef2_over_coef1, t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(
        self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor
    ) -> torch.Tensor:
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None) -> torch.Tensor:
        """Shift the mean by variance * grad log p(y | x_t) (Dhariwal & Nichol, Algorithm 1)."""
        gradient = cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None) -> Dict[str, Any]:
        """Score-based conditioning (Dhariwal & Nichol, Algorithm 2; Song et al. 2020).

        eps' = eps(pred_xstart) - sqrt(1 - abar_t) * grad log p(y | x_t). ``pred_xstart``
        already carries the Epsilon Scaling, so eps' is NOT divided by lambda again.
        """
        alpha_bar = self._extract(self.alphas_cumprod, t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(
            x, self._scale_timesteps(t), **(model_kwargs or {})
        )
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return out

    def p_sample(
        self,
        model: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs: Optional[dict] = None,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Dict[str, torch.Tensor]:
        """One ancestral (DDPM) step x_t -> x_{t-1}.

        :param noise: the Gaussian noise of this step (drawn with ``generator`` if None).
        :return: dict with ``sample``, ``pred_xstart`` and the p_mean_variance outputs.
        """
        out = self.p_mean_variance(
            model,
            x,
            t,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        if noise is None:
            noise = _randn_like(x, generator)
        nonzero_mask = (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))  # no noise at t = 0
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        out["sample"] = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return out

    def ddim_sample(
        self,
        model: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs: Optional[dict] = None,
        eta: float = 0.0,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Dict[str, torch.Tensor]:
        """One DDIM step (Song et al. 2021, eq. 12) x_t -> x_{t-1}.

        eps is re-derived from the (scaled, clipped) x_0 prediction, so Epsilon Scaling
        reaches both DDIM terms. ``noise`` is only drawn when ``eta > 0``.
        """
        out = self.p_mean_variance(
            model,
            x,
            t,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x.shape)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
        if eta == 0:
            out["sample"] = mean_pred + torch.sqrt(1 - alpha_bar_prev) * eps
            return out
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        mean_pred = mean_pred + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        if noise is None:
            noise = _randn_like(x, generator)
        nonzero_mask = (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))
        out["sample"] = mean_pred + nonzero_mask * sigma * noise
        return out

    def ddim_reverse_sample(
        self,
        model: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn=None,
        model_kwargs: Optional[dict] = None,
        eta: float = 0.0,
    ) -> Dict[str, torch.Tensor]:
        """One deterministic reverse-ODE step x_t -> x_{t+1} (DDIM inversion, eta = 0 only).

        It inverts the sampler's own ODE, so it uses the same Epsilon Scaling schedule as
        ``ddim_sample`` (build the diffusion with b = 1, k = 0 to invert plain ADM).
        """
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample is deterministic: eta must be 0")
        out = self.p_mean_variance(
            model,
            x,
            t,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract(self.alphas_cumprod_next, t, x.shape)
        out["sample"] = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        )
        return out

    # ------------------------------------------------------------ sampling loops

    def sample_loop_progressive(
        self,
        model: ModelFn,
        shape: Sequence[int],
        *,
        sampler: str = "ddpm",
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs: Optional[dict] = None,
        device=None,
        progress: bool = False,
        eta: float = 0.0,
        generator: Optional[torch.Generator] = None,
        noise_fn: Optional[NoiseFn] = None,
        start_step: Optional[int] = None,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """The one sampling loop behind ``p_sample_loop*`` and ``ddim_sample_loop*``.

        Yields the output dict of every step, from the noisiest (i = K-1) to the last (i = 0);
        each dict also holds ``t`` (the step index tensor) and ``x_t`` (the step's input).

        :param sampler: ``ddpm`` (ancestral) or ``ddim``.
        :param noise: x_T; drawn with ``generator`` if None.
        :param noise_fn: returns the per-step noise for an input like x (default: Gaussian
            from ``generator``); lets tests inject fixed noise.
        :param start_step: begin at this step index instead of K-1 (x = ``noise`` is then
            treated as x at that step): used by the exposure-bias tools.
        """
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        if device is None:
            device = next(model.parameters()).device
        img = noise if noise is not None else _randn(shape, device, generator)
        img = img.to(device)
        first = self.num_timesteps - 1 if start_step is None else int(start_step)
        if not 0 <= first < self.num_timesteps:
            raise ValueError(f"start_step {first} outside 0..{self.num_timesteps - 1}")
        indices = range(first, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        for i in indices:
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            step_noise = None
            if noise_fn is not None and (sampler == "ddpm" or eta > 0):
                step_noise = noise_fn(img)
            kwargs = dict(
                clip_denoised=clip_denoised,
                denoised_fn=denoised_fn,
                cond_fn=cond_fn,
                model_kwargs=model_kwargs,
                noise=step_noise,
                generator=generator,
            )
            with torch.no_grad():
                if sampler == "ddpm":
                    out = self.p_sample(model, img, t, **kwargs)
                else:
                    out = self.ddim_sample(model, img, t, eta=eta, **kwargs)
            out["t"] = t
            out["x_t"] = img
            yield out
            img = out["sample"]

    def p_sample_loop(self, model: ModelFn, shape: Sequence[int], *args, **kwargs) -> torch.Tensor:
        """Ancestral sampling from the model; returns the final x_0 batch.

        Arguments as ``p_sample_loop_progressive``.
        """
        return _last(self.p_sample_loop_progressive(model, shape, *args, **kwargs))["sample"]

    def p_sample_loop_progressive(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs: Optional[dict] = None,
        device=None,
        progress: bool = False,
        generator: Optional[torch.Generator] = None,
        noise_fn: Optional[NoiseFn] = None,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """Ancestral sampling, yielding the output dict of every step."""
        return self.sample_loop_progressive(
            model,
            shape,
            sampler="ddpm",
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            generator=generator,
            noise_fn=noise_fn,
        )

    def ddim_sample_loop(
        self, model: ModelFn, shape: Sequence[int], *args, **kwargs
    ) -> torch.Tensor:
        """DDIM sampling from the model; returns the final x_0 batch.

        Arguments as ``ddim_sample_loop_progressive``.
        """
        return _last(self.ddim_sample_loop_progressive(model, shape, *args, **kwargs))["sample"]

    def ddim_sample_loop_progressive(
        self,
        model: ModelFn,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs: Optional[dict] = None,
        device=None,
        progress: bool = False,
        eta: float = 0.0,
        generator: Optional[torch.Generator] = None,
        noise_fn: Optional[NoiseFn] = None,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """DDIM sampling, yielding the output dict of every step."""
        return self.sample_loop_progressive(
            model,
            shape,
            sampler="ddim",
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            eta=eta,
            generator=generator,
            noise_fn=noise_fn,
        )

    # ------------------------------------------------------------ losses and bounds

    def _vb_terms_bpd(
        self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None
    ) -> Dict[str, torch.Tensor]:
        """One term of the variational bound in bits per dimension (no Epsilon Scaling).

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the discretised decoder
        NLL -log p(x_0 | x_1) at t = 0.
        """
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(
            x_start=x_start, x_t=x_t, t=t
        )
        out = self.p_mean_variance(
            model,
            x_t,
            t,
            clip_denoised=clip_denoised,
            model_kwargs=model_kwargs,
            use_eps_scaler=False,
        )
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        assert decoder_nll.shape == x_start.shape
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        output = torch.where(t == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model: ModelFn,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Optional[dict] = None,
        noise: Optional[torch.Tensor] = None,
        input_perturbation: float = 0.0,
        xi: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Per-sample training losses for one batch.

        :param input_perturbation: gamma of DDPM-IP (Ning et al. 2023): the network sees
            x_t = q_sample(x_0, t, noise + gamma * xi) while the target stays ``noise``.
        :param xi: the perturbation noise (drawn when None and gamma > 0).
        :return: dict with ``loss`` and its parts (``mse``, ``vb``), each of shape (N,).
        """
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        if input_perturbation:
            if xi is None:
                xi = torch.randn_like(x_start)
            x_t = self.q_sample(x_start, t, noise=noise + input_perturbation * xi)
        else:
            x_t = self.q_sample(x_start, t, noise=noise)

        terms: Dict[str, torch.Tensor] = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            B, C = x_t.shape[:2]
            assert model_output.shape == (B, C * 2, *x_t.shape[2:])
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            # the VB term trains the variance only: the mean half is detached
            frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(
                lambda *args, r=frozen_out, **kwargs: r, x_start, x_t, t, clip_denoised=False
            )["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # the MSE term is a mean, the VB term a sum over timesteps (Nichol & Dhariwal)
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = {
            ModelMeanType.PREVIOUS_X: lambda: self.q_posterior_mean_variance(x_start, x_t, t)[0],
            ModelMeanType.START_X: lambda: x_start,
            ModelMeanType.EPSILON: lambda: noise,
        }[self.model_mean_type]()
        assert model_output.shape == target.shape == x_start.shape
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(qt_mean, qt_log_variance, 0.0, 0.0)
        return mean_flat(kl_prior) / np.log(2.0)

    def calc_bpd_loop(
        self,
        model: ModelFn,
        x_start: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: Optional[dict] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Dict[str, torch.Tensor]:
        """The full variational bound in bits per dimension, with its per-step terms.

        :return: ``total_bpd`` (N,), ``prior_bpd`` (N,), ``vb`` (N, T), ``xstart_mse`` (N, T),
            ``mse`` (N, T); the per-step columns run from the noisiest step (T-1) to 0.
        """
        batch = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((batch,), i, device=x_start.device, dtype=torch.long)
            noise = _randn_like(x_start, generator)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(
                    model, x_start, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb_t = torch.stack(vb, dim=1)  # (N, T); column 0 is the noisiest step, as the original
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb_t.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb_t,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
        }


def _last(iterator):
    """The last item of an iterator."""
    return collections.deque(iterator, maxlen=1)[0]


def _randn(shape, device, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.randn(*shape, device=device, generator=generator)


def _randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
