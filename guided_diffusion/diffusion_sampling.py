"""The one sampling loop of ``GaussianDiffusion`` and its options.

Every sampler is an option of ``SamplingLoop.sample_loop_progressive``; ``p_sample_loop*``
and ``ddim_sample_loop*`` are thin wrappers. All options combine with Epsilon Scaling
(lambda_i of the respaced step i divides the network's eps before x_0 is predicted, in
``p_mean_variance``) and with classifier guidance (``cond_fn``), and draw all randomness
from the given ``generator`` / ``noise_fn``.

- ``sampler="ddpm"``: ancestral sampling (Ho et al. 2020, Algorithm 2).
- ``sampler="ddim"``, ``eta``: DDIM (Song et al. 2021, eq. 12); ``eta = 0`` is
  deterministic, ``eta = 1`` has the DDPM posterior variance.
- ``sampler="dpmpp2m"``: DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for
  Guided Sampling of Diffusion Probabilistic Models", Algorithm 2), the multistep
  second-order solver of the probability-flow ODE in data prediction, on the
  (respaced) schedule's half log-SNR lambda_t = log(sqrt(abar_t) / sqrt(1 - abar_t)).
- ``time_shift``: the Time-Shift Sampler (Li et al., ICLR 2024, "Alleviating Exposure Bias
  in Diffusion Models through Sampling with Shifted Time Steps") for DDPM and DDIM.

Nothing here syncs with the host: the loop records the first step at which a sample
became non-finite, and ``check_finite_samples`` (one sync per batch) raises naming it.
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from .diffusion_schedule import ModelMeanType, _broadcast, _randn, _randn_like

ModelFn = Callable[..., torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]

SAMPLERS = ("ddpm", "ddim", "dpmpp2m")
# Time-Shift Sampler defaults, in original timesteps: shift while t > 300 (issue 15), within
# +-20 of 1000, at most the gap between the steps of the <= 50-step schedules where exposure
# bias matters, so each step is shifted within its own interval.
TS_CUTOFF = 300
TS_WINDOW = 20
# guided-diffusion's positional arguments after (model, shape) of the *_sample_loop* wrappers
_DDPM_POSITIONAL = ("noise", "clip_denoised", "denoised_fn", "cond_fn", "model_kwargs", "device")
_DDPM_POSITIONAL += ("progress",)
_DDIM_POSITIONAL = _DDPM_POSITIONAL + ("eta",)


class NonFiniteSampleError(ValueError):
    """Sampling produced NaN or inf (raised by ``check_finite_samples``)."""


def check_finite_samples(out: Dict[str, torch.Tensor]) -> None:
    """Raise ``NonFiniteSampleError`` naming the first sampling step at which a sample (or
    the network's eps) was not finite.

    ``out`` is the last dict yielded by ``sample_loop_progressive`` (its
    ``nonfinite_step`` records every step on the device); this costs one host sync, so call
    it once per batch. ``p_sample_loop`` and ``ddim_sample_loop`` call it.
    """
    bad = out["nonfinite_step"]
    if bool((bad >= 0).any()):
        n_bad = int((bad >= 0).sum())
        raise NonFiniteSampleError(
            f"sampling produced NaN/inf at step i={int(bad.max())} (counting down to 0) in "
            f"{n_bad} of {bad.numel()} samples: check --eps_scaler, the guidance scale and "
            "the checkpoint"
        )


def time_shift_timesteps(
    x: torch.Tensor,
    t_nominal: torch.Tensor,
    t_next: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    window: int,
) -> torch.Tensor:
    """The shifted timestep of the Time-Shift Sampler (Li et al. 2024), per sample.

    Among the timesteps tau with |tau - t_nominal| <= window, t_next < tau < T, the one
    whose 1 - abar_tau is closest to the pixel variance of x (over C x H x W); ties go to
    the smaller tau.

    :param x: (N, ...) the current samples.
    :param t_nominal: (N,) the nominal timesteps of the schedule ``alphas_cumprod`` (T,).
    :param t_next: (N,) the timesteps that the step goes to (-1 for x_0).
    :return: (N,) long tensor.
    """
    var = x.double().flatten(1).var(dim=1, unbiased=False)  # (N,)
    offsets = torch.arange(-window, window + 1, device=x.device)
    cand = t_nominal[:, None] + offsets  # (N, 2 window + 1)
    valid = (cand > t_next[:, None]) & (cand < alphas_cumprod.shape[0])
    gap = (var[:, None] - (1 - alphas_cumprod[cand.clamp(0, alphas_cumprod.shape[0] - 1)])).abs()
    gap = gap.masked_fill(~valid, float("inf"))
    return cand.gather(1, gap.argmin(dim=1, keepdim=True)).squeeze(1)


def generalized_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    abar_from: torch.Tensor,
    abar_to: torch.Tensor,
    sigma: torch.Tensor,
) -> torch.Tensor:
    """The mean of the step x_s -> x_t between any two noise levels (Song et al. 2021,
    eq. 12): sqrt(abar_t) x0 + sqrt(1 - abar_t - sigma^2) eps, eps = (x - sqrt(abar_s) x0) /
    sqrt(1 - abar_s). sigma = eta * sigma_post gives DDIM; sigma = sigma_post, the posterior
    std sqrt((1 - abar_t) / (1 - abar_s) * (1 - abar_s / abar_t)), the DDPM posterior mean
    q(x_t | x_s, x_0)."""
    eps = (x - abar_from.sqrt() * x0) / (1 - abar_from).sqrt()
    return abar_to.sqrt() * x0 + (1 - abar_to - sigma**2).clamp(min=0).sqrt() * eps


def posterior_std(abar_from: torch.Tensor, abar_to: torch.Tensor) -> torch.Tensor:
    """The std of q(x_t | x_s, x_0) between noise levels abar_s < abar_t."""
    return ((1 - abar_to) / (1 - abar_from) * (1 - abar_from / abar_to)).sqrt()


def _named(names: Sequence[str], args: tuple, kwargs: dict) -> dict:
    """Bind guided-diffusion's positional wrapper arguments to their names."""
    if len(args) > len(names):
        raise TypeError(f"at most {len(names)} positional arguments after shape: {names}")
    twice = set(names[: len(args)]) & set(kwargs)
    if twice:
        raise TypeError(f"argument(s) given twice: {sorted(twice)}")
    return {**dict(zip(names, args)), **kwargs}


def _last(iterator):
    """The last item of an iterator."""
    return collections.deque(iterator, maxlen=1)[0]


def _track_nonfinite(nonfinite: torch.Tensor, out: Dict[str, torch.Tensor], i: int):
    """(N,) the first step i at which each sample's x or eps was not finite (-1: none yet);
    device-side, no sync."""
    finite = torch.isfinite(out["sample"]).flatten(1).all(dim=1)
    if "eps" in out:
        finite &= torch.isfinite(out["eps"]).flatten(1).all(dim=1)
    return torch.where((nonfinite < 0) & ~finite, i, nonfinite)


def _noise_source(noise: Optional[torch.Tensor], generator: Optional[torch.Generator]) -> NoiseFn:
    """A step's noise: ``noise`` if given, else Gaussian noise from ``generator``."""
    return lambda x: _randn_like(x, generator) if noise is None else noise


def _recording(cond_fn: Callable[..., torch.Tensor], grads: list) -> Callable[..., torch.Tensor]:
    """``cond_fn`` that also appends each gradient it returns to ``grads``."""

    def recorded(*args, **kwargs):
        grads.append(cond_fn(*args, **kwargs))
        return grads[-1]

    return recorded


def dpmpp2m_coefficients(alphas_cumprod: np.ndarray):
    """Per-step coefficients of DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) on a
    schedule, for the step i -> i - 1 (i = 0: to abar = 1):

        x_{i-1} = sigma_ratio_i x_i + phi_i ((1 + w_i) d_i - w_i d_{i+1})

    with alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma),
    h_i = lambda_{i-1} - lambda_i, sigma_ratio_i = sigma_{i-1} / sigma_i,
    phi_i = -alpha_{i-1} expm1(-h_i) and the second-order weight w_i = 1 / (2 r_i),
    r_i = h_{i+1} / h_i. w_i = 0 (first order, the DDIM step) at the first step i = K - 1
    and at the final ones: i = 1 into the last grid point t_0 (sigma_0 <= 0.01 on ADM's
    schedules; Lu et al.'s lower-order final step, as diffusers takes it into sigma = 0:
    on ADM's uniform grid the last lambda gap is several times the one before it, where
    extrapolating d overshoots) and i = 0, where h = inf and x_{-1} = d_0.

    :return: float64 arrays (sigma_ratio, phi, w), each (K,).
    """
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    abar_prev = np.append(1.0, abar[:-1])
    with np.errstate(divide="ignore"):
        lam, lam_prev = 0.5 * np.log(abar / (1 - abar)), 0.5 * np.log(abar_prev / (1 - abar_prev))
    h = lam_prev - lam  # (K,), h_0 = inf
    sigma_ratio = np.sqrt((1 - abar_prev) / (1 - abar))
    phi = -np.sqrt(abar_prev) * np.expm1(-h)
    w = np.zeros_like(abar)
    w[2:-1] = h[2:-1] / (2 * h[3:])  # 1 / (2 r_i) for 2 <= i <= K - 2
    return sigma_ratio, phi, w


@dataclass(frozen=True)
class _LoopOptions:
    """The per-step options of the loop (checked by ``SamplingLoop._loop_options``)."""

    sampler: str
    eta: float = 0.0
    time_shift: bool = False
    ts_cutoff: int = TS_CUTOFF
    ts_window: int = TS_WINDOW
    clip_denoised: bool = True
    denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    cond_fn: Optional[Callable[..., torch.Tensor]] = None
    model_kwargs: Optional[dict] = None

    @property
    def stochastic(self) -> bool:
        return self.sampler == "ddpm" or (self.sampler == "ddim" and self.eta > 0)


class SamplingLoop:
    """The sampling loop; mixed into ``GaussianDiffusion`` (uses its schedule arrays,
    ``p_mean_variance``, guidance and the DDPM/DDIM updates)."""

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
        time_shift: bool = False,
        ts_cutoff: int = TS_CUTOFF,
        ts_window: int = TS_WINDOW,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """The one sampling loop behind ``p_sample_loop*`` and ``ddim_sample_loop*``.

        Yields the output dict of every step, from the noisiest (i = K-1) to the last
        (i = 0); each holds ``sample``, ``pred_xstart``, ``t`` (the step index tensor),
        ``x_t`` (the step's input), ``nonfinite_step`` (see ``check_finite_samples``) and,
        with ``time_shift``, ``tau`` (the original timestep the step started from).

        :param sampler: ``ddpm``, ``ddim`` or ``dpmpp2m`` (see the module doc).
        :param noise: x_T; drawn with ``generator`` if None.
        :param eta: DDIM's noise scale in [0, 1] (``ddim`` only).
        :param noise_fn: returns the per-step noise for an input like x (default: Gaussian
            from ``generator``); lets tests inject fixed noise.
        :param start_step: begin at this step index instead of K-1 (x = ``noise`` is then
            treated as x at that step; ``dpmpp2m`` restarts at first order).
        :param time_shift: the Time-Shift Sampler for ``ddpm``/``ddim`` (``_time_shift``):
            while the nominal original timestep > ``ts_cutoff``, a step starts from the
            original timestep within +-``ts_window`` whose 1 - abar matches x's variance.
        """
        opts = self._loop_options(
            sampler,
            eta=eta,
            time_shift=time_shift,
            ts_cutoff=ts_cutoff,
            ts_window=ts_window,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
        )
        if device is None:
            device = next(model.parameters()).device
        img = (noise if noise is not None else _randn(shape, device, generator)).to(device)
        draw = noise_fn if noise_fn is not None else _noise_source(None, generator)
        nonfinite = torch.full((img.shape[0],), -1, device=device, dtype=torch.long)
        prev = None
        for i in self._step_indices(start_step, progress):
            t = torch.full((img.shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = self._loop_step(model, img, t, opts, draw, prev)
            nonfinite = _track_nonfinite(nonfinite, out, i)
            out.update(t=t, x_t=img, nonfinite_step=nonfinite)
            yield out
            img, prev = out["sample"], out

    def _step_indices(self, start_step: Optional[int], progress: bool) -> Iterable[int]:
        """K-1 (or ``start_step``) down to 0, with a progress bar if asked."""
        first = self.num_timesteps - 1 if start_step is None else int(start_step)
        if not 0 <= first < self.num_timesteps:
            raise ValueError(f"start_step {first} outside 0..{self.num_timesteps - 1}")
        if progress:
            from tqdm.auto import tqdm

            return tqdm(range(first, -1, -1))
        return range(first, -1, -1)

    def _loop_options(self, sampler: str, **options) -> _LoopOptions:
        """The checked options of the loop; a one-line ``ValueError`` names the fix."""
        o = _LoopOptions(sampler, **options)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if not 0.0 <= o.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1] (0 = deterministic DDIM), got {o.eta}")
        if o.eta != 0.0 and sampler != "ddim":
            raise ValueError(f"eta is DDIM's noise scale: use sampler 'ddim' or eta 0 ({sampler})")
        if not o.time_shift:
            return o
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"time_shift works with the ddpm and ddim samplers, not {sampler}")
        if self.model_mean_type != ModelMeanType.EPSILON:
            raise ValueError("time_shift needs an eps-prediction model (--predict_xstart False)")
        if int(o.ts_cutoff) != o.ts_cutoff or o.ts_cutoff < 0:
            raise ValueError(f"ts_cutoff must be a timestep >= 0, got {o.ts_cutoff}")
        if int(o.ts_window) != o.ts_window or o.ts_window < 0:
            raise ValueError(
                f"ts_window must be a whole number of timesteps >= 0, got {o.ts_window}"
            )
        return o

    def _loop_step(self, model, x, t, o: _LoopOptions, draw: NoiseFn, prev=None):
        """One step x_t -> x_{t-1} of every sampler: the model (``p_mean_variance``, with
        Epsilon Scaling), guidance (``condition_mean`` for DDPM, ``condition_score``
        otherwise), the sampler's update and the time shift.

        :param t: (N,) step indices. :param draw: the step's noise for an input like x.
        :param prev: the previous step's output (DPM-Solver++ reuses its x_0 prediction).
        """
        out = self.p_mean_variance(
            model,
            x,
            t,
            clip_denoised=o.clip_denoised,
            denoised_fn=o.denoised_fn,
            model_kwargs=o.model_kwargs,
        )
        noise = draw(x) if o.stochastic else None
        grads: list = []  # the guidance gradient, which the time shift reuses
        cond_fn = o.cond_fn if o.cond_fn is None else _recording(o.cond_fn, grads)
        if o.sampler == "ddpm":
            if cond_fn is not None:
                out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=o.model_kwargs)
            out["sample"] = self._ddpm_update(out, t, noise)
        else:
            if cond_fn is not None:
                out = self.condition_score(cond_fn, out, x, t, model_kwargs=o.model_kwargs)
            if o.sampler == "ddim":
                out["sample"] = self._ddim_update(out, x, t, o.eta, noise)
            else:
                out["sample"] = self._dpmpp2m_update(out["pred_xstart"], x, t, prev)
        if o.time_shift:
            self._time_shift(out, x, t, o, noise, grads[0] if grads else None)
        return out

    @functools.cached_property
    def _dpmpp2m_coefficients(self):
        return dpmpp2m_coefficients(self.alphas_cumprod)

    def _dpmpp2m_update(self, d: torch.Tensor, x: torch.Tensor, t: torch.Tensor, prev):
        """DPM-Solver++(2M) (see ``dpmpp2m_coefficients``); ``d`` is the x_0 prediction with
        Epsilon Scaling (d = x_0(eps / lambda)), clipping and guidance applied. First
        order when there is no previous step (the first one, or after ``start_step``)."""
        sigma_ratio, phi, w = (self._extract(a, t, x.shape) for a in self._dpmpp2m_coefficients)
        if prev is not None:
            d = (1 + w) * d - w * prev["pred_xstart"]
        return sigma_ratio * x + phi * d

    def _time_shift(self, out, x, t, o: _LoopOptions, noise, grad) -> None:
        """The Time-Shift Sampler (Li et al. 2024) on a DDPM or DDIM step, in place on ``out``.

        While a sample's nominal original timestep t_i exceeds ``ts_cutoff`` (never at the
        last step), its step starts from tau = ``time_shift_timesteps`` on the original
        (un-respaced) schedule: x_0 is predicted from the network's eps / lambda_i with
        abar_tau (then ``denoised_fn``, clipping and guidance at tau), and the generalized
        step goes from abar_tau to abar of the next nominal timestep. As issue 15 specifies,
        the network itself is evaluated at the nominal t_i. DDPM keeps the step's variance
        (learned or fixed) times the ratio of the posterior variances of tau -> next and
        t_i -> next (exact for fixed-small). Samples with tau = t_i keep the plain step bit
        for bit; ``out["tau"]`` records tau.
        """
        tmap = self._device_array(self.original_timesteps, x.device)  # (T',) long
        abar = self._device_array(self.original_alphas_cumprod, x.device)  # (T,) float64
        t_nom = tmap[t]
        t_next = torch.where(t > 0, tmap[(t - 1).clamp(min=0)], -1)
        tau = time_shift_timesteps(x, t_nom, t_next, abar, o.ts_window)
        tau = torch.where((t_nom > o.ts_cutoff) & (t > 0), tau, t_nom)
        ab_tau = _broadcast(abar[tau].float(), x.shape)
        ab_next = _broadcast(torch.where(t > 0, abar[t_next.clamp(min=0)], 1.0).float(), x.shape)
        eps = self._scaled_eps(out["eps"], t)
        x0 = (x - (1 - ab_tau).sqrt() * eps) / ab_tau.sqrt()
        x0 = self._process_xstart(x0, o.clip_denoised, o.denoised_fn)
        sigma_post = posterior_std(ab_tau, ab_next)
        if o.sampler == "ddim":
            if grad is not None:  # score conditioning (Dhariwal & Nichol, Algorithm 2) at tau
                e = (x - ab_tau.sqrt() * x0) / (1 - ab_tau).sqrt() - (1 - ab_tau).sqrt() * grad
                x0 = (x - (1 - ab_tau).sqrt() * e) / ab_tau.sqrt()
            sample = generalized_step(x, x0, ab_tau, ab_next, o.eta * sigma_post)
            if noise is not None:
                sample = sample + o.eta * sigma_post * noise
        else:
            nominal = self._extract(self.posterior_variance, t, x.shape)
            variance = out["variance"] * sigma_post**2 / nominal
            sample = generalized_step(x, x0, ab_tau, ab_next, sigma_post)
            if grad is not None:
                sample = sample + variance * grad.float()
            sample = sample + variance.sqrt() * noise
        shifted = (tau != t_nom).reshape(-1, *([1] * (x.ndim - 1)))
        out["sample"] = torch.where(shifted, sample, out["sample"])
        out["pred_xstart"] = torch.where(shifted, x0, out["pred_xstart"])
        out["tau"] = tau

    def sample_loop(self, model: ModelFn, shape: Sequence[int], **options) -> torch.Tensor:
        """``sample_loop_progressive(model, shape, **options)`` run to the end: the final x_0
        batch, checked with ``check_finite_samples`` (one host sync)."""
        out = _last(self.sample_loop_progressive(model, shape, **options))
        check_finite_samples(out)
        return out["sample"]

    # ------------------------------------------------------------ guided-diffusion's wrappers

    def p_sample_loop(self, model: ModelFn, shape: Sequence[int], *args, **kwargs) -> torch.Tensor:
        """Ancestral sampling; the final x_0 batch (see ``sample_loop``). Arguments as
        ``p_sample_loop_progressive``."""
        return self.sample_loop(
            model, shape, sampler="ddpm", **_named(_DDPM_POSITIONAL, args, kwargs)
        )

    def p_sample_loop_progressive(self, model: ModelFn, shape: Sequence[int], *args, **kwargs):
        """Ancestral sampling (Ho et al. 2020), yielding the output dict of every step.

        Positional arguments after ``shape`` as in guided-diffusion: noise, clip_denoised,
        denoised_fn, cond_fn, model_kwargs, device, progress; and every keyword option of
        ``sample_loop_progressive`` (generator, noise_fn, time_shift, ...).
        """
        options = _named(_DDPM_POSITIONAL, args, kwargs)
        return self.sample_loop_progressive(model, shape, sampler="ddpm", **options)

    def ddim_sample_loop(self, model: ModelFn, shape: Sequence[int], *args, **kwargs):
        """DDIM sampling; the final x_0 batch (see ``sample_loop``). Arguments as
        ``ddim_sample_loop_progressive``."""
        return self.sample_loop(
            model, shape, sampler="ddim", **_named(_DDIM_POSITIONAL, args, kwargs)
        )

    def ddim_sample_loop_progressive(self, model: ModelFn, shape: Sequence[int], *args, **kwargs):
        """DDIM sampling (Song et al. 2021), yielding the output dict of every step.

        Positional arguments after ``shape`` as in guided-diffusion: noise, clip_denoised,
        denoised_fn, cond_fn, model_kwargs, device, progress, eta; and every keyword option
        of ``sample_loop_progressive``.
        """
        options = _named(_DDIM_POSITIONAL, args, kwargs)
        return self.sample_loop_progressive(model, shape, sampler="ddim", **options)
