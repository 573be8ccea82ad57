"""Gaussian diffusion (Ho et al. 2020; Nichol & Dhariwal 2021) with Epsilon Scaling.

Epsilon Scaling (Ning et al., ICLR 2024, "Elucidating the Exposure Bias in Diffusion
Models"): at sampling time only, the predicted noise is divided by ``lambda_i = k * i + b``
before x_0 is predicted, where ``i`` is the index of the step in the (respaced) sampling
schedule, ``i = 0`` being the last, least noisy step::

    x0_hat = sqrt(1 / abar_i) * x_t - sqrt(1 / abar_i - 1) * eps_theta(x_t, t) / lambda_i

``b = 1, k = 0`` is plain ADM, bit for bit. Training losses never use lambda.

``GaussianDiffusion`` reads as the paper, one part per module:

- the schedule arrays and the forward process q(x_t | x_0): ``diffusion_schedule.NoiseSchedule``;
- the reverse step p(x_{t-1} | x_t) (model mean and variance, guidance, DDPM and DDIM
  steps): this module;
- the sampling loop and its options (DDIM eta, time shift, DPM-Solver++(2M), the
  non-finite check): ``diffusion_sampling.SamplingLoop``;
- the training losses and the variational bound: ``diffusion_losses.VariationalBound``.

The sampler functions are plain tensor code: no logging, no file I/O, no host syncs.
Randomness comes from an optional ``torch.Generator`` (or an injected ``noise_fn``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import torch

from .diffusion_losses import VariationalBound
from .diffusion_sampling import (
    ModelFn,
    NoiseFn,
    NonFiniteSampleError,
    SamplingLoop,
    _noise_source,
    check_finite_samples,
)
from .diffusion_schedule import (
    LossType,
    ModelMeanType,
    ModelVarType,
    NoiseSchedule,
    _extract_into_tensor,
    betas_for_alpha_bar,
    eps_scaler_schedule,
    get_named_beta_schedule,
)

__all__ = [
    "GaussianDiffusion",
    "LossType",
    "ModelFn",
    "ModelMeanType",
    "ModelVarType",
    "NoiseFn",
    "NonFiniteSampleError",
    "_extract_into_tensor",
    "betas_for_alpha_bar",
    "check_finite_samples",
    "eps_scaler_schedule",
    "get_named_beta_schedule",
]


class GaussianDiffusion(NoiseSchedule, SamplingLoop, VariationalBound):
    """Training and sampling utilities for a diffusion process with ``len(betas)`` steps.

    :param betas: float64 betas, one per step.
    :param model_mean_type / model_var_type / loss_type: see the enums.
    :param rescale_timesteps: feed the network t scaled to [0, 1000).
    :param eps_scaler: b of the Epsilon Scaling schedule lambda_i = k * i + b (1.0 = off).
    :param eps_scaler_k: k of that schedule (0.0 = uniform). Change both on an existing
        process with ``with_eps_scaler``.
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
        self._set_schedule(betas)
        self._set_eps_scaler(eps_scaler, eps_scaler_k)

    # ------------------------------------------------------------ p(x_{t-1} | x_t)

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
        B, C = x.shape[:2]
        assert t.shape == (B,)
        model_output = model(x, self._scale_timesteps(t), **(model_kwargs or {}))
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            assert model_output.shape == (B, C * 2, *x.shape[2:])
            model_output, model_var_values = torch.split(model_output, C, dim=1)
        else:
            model_var_values = None
        model_variance, model_log_variance = self._model_variance(model_var_values, x, t)

        out: Dict[str, torch.Tensor] = {}
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = self._predict_xstart_from_xprev(x, t, model_output)
            pred_xstart = self._process_xstart(pred_xstart, clip_denoised, denoised_fn)
            model_mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = model_output
            else:
                out["eps"] = model_output
                eps = self._scaled_eps(model_output, t) if use_eps_scaler else model_output
                pred_xstart = self._predict_xstart_from_eps(x, t, eps)
            pred_xstart = self._process_xstart(pred_xstart, clip_denoised, denoised_fn)
            model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)

        assert model_mean.shape == model_log_variance.shape == pred_xstart.shape == x.shape
        out.update(
            mean=model_mean,
            variance=model_variance,
            log_variance=model_log_variance,
            pred_xstart=pred_xstart,
        )
        return out

    def _model_variance(self, model_var_values: Optional[torch.Tensor], x, t):
        """The variance of p(x_{t-1} | x_t): learned (Nichol & Dhariwal eq. 15, the output
        in [-1, 1] interpolating log beta~_t and log beta_t) or fixed.

        :return: (variance, log_variance), broadcast to ``x``.
        """
        if self.model_var_type == ModelVarType.LEARNED:
            return torch.exp(model_var_values), model_var_values
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            min_log = self._extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = self._extract(self.log_betas, t, x.shape)
            frac = (model_var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            return torch.exp(log_variance), log_variance
        if self.model_var_type == ModelVarType.FIXED_LARGE:
            # beta_t, with the first entry set to the posterior variance for a better decoder
            variance, log_variance = self.fixed_large_variance, self.fixed_large_log_variance
        else:
            variance, log_variance = self.posterior_variance, self.posterior_log_variance_clipped
        return self._extract(variance, t, x.shape), self._extract(log_variance, t, x.shape)

    def _scaled_eps(self, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps / lambda_i (Epsilon Scaling); the identity, bit for bit, when lambda = 1."""
        return eps / self.eps_scale_at(t, eps.shape) if self._eps_scaling else eps

    @staticmethod
    def _process_xstart(x0: torch.Tensor, clip_denoised: bool, denoised_fn) -> torch.Tensor:
        """``denoised_fn`` (if any), then clipping to [-1, 1] when ``clip_denoised``."""
        if denoised_fn is not None:
            x0 = denoised_fn(x0)
        return x0.clamp(-1, 1) if clip_denoised else x0

    # ------------------------------------------------------------ classifier guidance

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
        gradient = cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))
        eps = eps - (1 - alpha_bar).sqrt() * gradient
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return out

    # ------------------------------------------------------------ one reverse step

    def _ddpm_update(self, out, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_{t-1} = mean + sigma_t z (Ho et al., Algorithm 2); no noise at t = 0."""
        nonzero_mask = (t != 0).float().reshape(-1, *([1] * (noise.ndim - 1)))
        return out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise

    def _ddim_update(self, out, x, t, eta: float, noise: Optional[torch.Tensor]):
        """DDIM (Song et al. 2021, eq. 12), eps re-derived from the (scaled, clipped) x_0;
        ``noise`` is used only when ``eta > 0``."""
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x.shape)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
        if eta == 0:
            return mean_pred + torch.sqrt(1 - alpha_bar_prev) * eps
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        # clamped: in float32, 1 - abar_prev - sigma^2 (exactly >= 0) rounds to -6e-8 at the
        # first step of a 3-step cosine schedule with eta = 1, where the original's sqrt
        # gives NaN; elsewhere the clamp is the identity, bit for bit
        mean_pred = mean_pred + torch.sqrt((1 - alpha_bar_prev - sigma**2).clamp(min=0)) * eps
        nonzero_mask = (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))
        return mean_pred + nonzero_mask * sigma * noise

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
        """One ancestral (DDPM) step x_t -> x_{t-1}: ``sample_loop_progressive``'s step.

        :param noise: the Gaussian noise of this step (drawn with ``generator`` if None).
        :return: dict with ``sample``, ``pred_xstart`` and the p_mean_variance outputs.
        """
        step = dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn)
        o = self._loop_options("ddpm", model_kwargs=model_kwargs, **step)
        return self._loop_step(model, x, t, o, _noise_source(noise, generator))

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
        """One DDIM step (Song et al. 2021, eq. 12) x_t -> x_{t-1}: the loop's step.

        eps is re-derived from the (scaled, clipped) x_0 prediction, so Epsilon Scaling
        reaches both DDIM terms. ``noise`` is only drawn when ``eta > 0``.
        """
        step = dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn)
        o = self._loop_options("ddim", eta=eta, model_kwargs=model_kwargs, **step)
        return self._loop_step(model, x, t, o, _noise_source(noise, generator))

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
