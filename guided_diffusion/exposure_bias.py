"""Exposure-bias measurements (Ning et al., ICLR 2024, "Elucidating the Exposure Bias in
Diffusion Models").

The quantities of the paper, computed with plain tensor functions (no logging, no file I/O
inside the math; results leave as numpy arrays):

* the epsilon L2-norm per sampling step (Sec. "Epsilon L2-norm"): the *training* curve
  ``T_i = E ||eps_theta(x_t, t)||`` with ``x_t ~ q(x_t | x_0)`` (``train_eps_norms``) and
  the *sampling* curve ``S_i = E ||eps_theta(x̂_t, t) / lambda_i||`` along consecutive
  sampling (``sampling_pass``); their relative gap ``g_i = S_i / T_i - 1``
  (``relative_gap``);
* ``delta_t = (sigma_hat_t - sqrt(1 - abar_t))^2`` (Sec. "Metric delta_t",
  ``delta_curve``), where ``sigma_hat_t`` is the per-pixel standard deviation over the N
  samples of ``x̂_t - sqrt(abar_t) x_0``, averaged over C x H x W.

The Epsilon Scaling fit built on these curves is in ``calibration``, the figures in
``plots``.

Conventions shared by every function, CSV and plot
--------------------------------------------------
The respaced process has K steps with index ``i = K-1 .. 0`` (``i = 0`` is the last, least
noisy step; lambda is indexed by i). Step i consumes the state at original timestep
``t_i = timestep_map[i]`` (the 0-based timestep of the 1000-step schedule that the network
receives; the paper's 1-based ``t`` is ``t_i + 1``), with ``abar_i`` = the respaced
``alphas_cumprod[i]`` = the original ``abar`` at ``t_i``.

**Row i describes the state x_{t_i} fed to step i.** The eps norms of row i are the
network's outputs on that state; ``delta`` of row i compares the distribution of that state
with ``q(x_{t_i} | x_0) = N(sqrt(abar_i) x_0, (1 - abar_i) I)``:

* ``consecutive`` mode: ``x_0`` is forward-diffused to the first step,
  ``x̂_{t_{K-1}} = q_sample(x_0, t_{K-1})`` (so row K-1 is exact by construction and shows the
  statistical noise floor), then sampled; row ``i < K-1`` is the sample produced by step
  ``i + 1``.
* ``each_step`` mode: row ``i < K-1`` is the output of ONE reverse step (step ``i + 1``)
  taken from a true ``x_{t_{i+1}} = q_sample(x_0, t_{i+1})``; row K-1 is the true
  ``q_sample(x_0, t_{K-1})`` itself (no step produces it).

The output of the last step, x̂_0 (clean, expected spread 0), is not a row: it is returned
as ``final_sigma_hat`` (std of ``x̂_0 - x_0``). Internally arrays are indexed by i; files
list rows from the noisiest step (i = K-1) to the last (i = 0).

Randomness is drawn sample by sample from generators seeded by (seed, sample index, stream)
on the CPU (``seeding``), so the result of a sample depends on neither the batch it is in,
the number of processes, nor the device. The measured samples are the first N images of a
dataset; process r of W measures the images j with ``j % W == r`` (``data_share``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion, ModelMeanType
from .seeding import sample_seeds, stream_seed

__all__ = [
    "STREAM_EACH",
    "STREAM_SAMPLE",
    "STREAM_TRAIN",
    "Moments",
    "PassResult",
    "PerSampleNoise",
    "delta_curve",
    "each_step_pass",
    "file_rows",
    "merge_moments",
    "original_timesteps",
    "relative_gap",
    "sample_seeds",
    "sampling_pass",
    "train_eps_norms",
]

ModelFn = Callable[..., torch.Tensor]
Batch = Tuple[np.ndarray, torch.Tensor, dict]  # (global sample indices, x0 (n, C, H, W), kwargs)

STREAM_TRAIN = 0  # the q(x_t | x_0) noise of the training curve, one draw per step
STREAM_SAMPLE = 1  # x_T, then the per-step DDPM noise of consecutive sampling
STREAM_EACH = 2  # each_step mode: forward noise and step noise for every step


# ----------------------------------------------------------------------------- noise


class PerSampleNoise:
    """Standard normal noise for a batch, drawn sample by sample from per-sample generators.

    Calling it returns the next (N, *shape) draw on ``device``; sample n's draws depend only
    on ``seeds[n]`` (``sample_seeds``) and ``stream`` (``seeding.stream_seed``). Usable as
    the ``noise_fn`` of ``sample_loop_progressive``.
    """

    def __init__(
        self,
        seeds: Sequence[int],
        stream: int,
        shape: Sequence[int],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.gens = [torch.Generator().manual_seed(stream_seed(s, stream)) for s in seeds]
        self.shape = tuple(shape)
        self.device = device
        self.dtype = dtype

    def __call__(self, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        draws = [torch.randn(self.shape, generator=g, dtype=self.dtype) for g in self.gens]
        return torch.stack(draws).to(self.device)  # (N, C, H, W)


# ----------------------------------------------------------------------------- moments


@dataclass
class Moments:
    """Per-element count, mean and sum of squared deviations over samples (float64).

    ``mean`` and ``m2`` have shape (R, C, H, W): one row per state. Merging uses the
    pairwise update of Chan et al., so batches and processes combine exactly.
    """

    n: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, x: torch.Tensor) -> Moments:
        """Moments over axis 0 of ``x`` (N, R, C, H, W)."""
        return cls.stack(int(x.shape[0]), [_row_stats(x[:, r]) for r in range(x.shape[1])])

    @classmethod
    def stack(cls, n: int, rows: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Moments:
        """Moments from per-row ``(mean, m2)`` tensors of ``_row_stats`` over n samples."""
        mean = torch.stack([m for m, _ in rows]).cpu().numpy()
        m2 = torch.stack([q for _, q in rows]).cpu().numpy()
        return cls(n, mean, m2)

    def merge(self, other: Optional[Moments]) -> Moments:
        if other is None or other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        d = other.mean - self.mean
        mean = self.mean + d * (other.n / n)
        m2 = self.m2 + other.m2 + d**2 * (self.n * other.n / n)
        return Moments(n, mean, m2)

    def std(self) -> np.ndarray:
        """Per-element sample standard deviation (unbiased variance, ddof = 1)."""
        if self.n < 2:
            raise ValueError(f"a standard deviation needs at least 2 samples, got {self.n}")
        return np.sqrt(self.m2 / (self.n - 1))


def _row_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, sum of squared deviations) over axis 0 of ``x`` (N, C, H, W), in float64."""
    x = x.double()
    mean = x.mean(dim=0)
    return mean, ((x - mean) ** 2).sum(dim=0)


def _residual_stats(
    x: torch.Tensor, scale: Any, x0: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``_row_stats`` of the residual ``x - scale * x_0`` (scale = sqrt(abar_i), or 1 at x̂_0)."""
    return _row_stats(x.double() - scale * x0.double())


def merge_moments(parts: Iterable[Optional[Moments]]) -> Optional[Moments]:
    """Merge moments in the given order (None entries are skipped)."""
    out: Optional[Moments] = None
    for p in parts:
        if p is not None:
            out = p if out is None else out.merge(p)
    return out


# ----------------------------------------------------------------------------- diffusion helpers


def original_timesteps(diffusion: GaussianDiffusion) -> np.ndarray:
    """t_i, the original timestep of respaced step i (identity for an unspaced process)."""
    tmap = getattr(diffusion, "timestep_map", None)
    if tmap is None:
        return np.arange(diffusion.num_timesteps)
    return np.asarray(tmap, dtype=np.int64)


def check_eps_model(diffusion: GaussianDiffusion) -> None:
    """Eps norms are defined for eps-prediction models only; raise ValueError otherwise."""
    if diffusion.model_mean_type != ModelMeanType.EPSILON:
        raise ValueError("epsilon norms need an eps-prediction model: use --predict_xstart False")


def _steps(n: int, i: int, device: torch.device) -> torch.Tensor:
    return torch.full((n,), i, device=device, dtype=torch.long)


def _flat_norm(x: torch.Tensor) -> torch.Tensor:
    return x.float().flatten(1).norm(dim=1)  # (N,)


def _sqrt_alphas_cumprod(diffusion: GaussianDiffusion, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.sqrt(diffusion.alphas_cumprod)).to(device)  # (K,) float64


# ----------------------------------------------------------------------------- measurements


def train_eps_norms(
    diffusion: GaussianDiffusion,
    model: ModelFn,
    x0: torch.Tensor,
    seeds: Sequence[int],
    *,
    model_kwargs: Optional[dict] = None,
) -> np.ndarray:
    """The training curve per sample: ``||eps_theta(x_t_i, t_i)||_2`` (Frobenius over C x H x W)
    with ``x_t_i = q_sample(x_0, t_i)``, fresh noise for every step.

    :param x0: (N, C, H, W) data in [-1, 1].
    :param seeds: per-sample seeds (``sample_seeds``).
    :return: float64 (N, K), column i = step index i.
    """
    check_eps_model(diffusion)
    n, dev = x0.shape[0], x0.device
    noise = PerSampleNoise(seeds, STREAM_TRAIN, x0.shape[1:], dev)
    norms = [None] * diffusion.num_timesteps
    with torch.no_grad():
        for i in reversed(range(diffusion.num_timesteps)):
            t = _steps(n, i, dev)
            x_t = diffusion.q_sample(x0, t, noise=noise())
            out = diffusion.p_mean_variance(
                model, x_t, t, clip_denoised=False, model_kwargs=model_kwargs, use_eps_scaler=False
            )
            norms[i] = _flat_norm(out["eps"])
    return torch.stack(norms, dim=1).double().cpu().numpy()


@dataclass
class PassResult:
    """One sampling pass over a batch.

    ``eps_norm``: (N, K) raw ``||eps_theta(x̂_i, t_i)||`` (before the division by lambda_i);
    ``lam``: (K,) lambda_i; ``moments``: residual ``x̂_i - sqrt(abar_i) x_0`` per row i (K rows);
    ``final``: residual ``x̂_0 - x_0`` of the last output (1 row). Moments are None unless
    requested.
    """

    eps_norm: np.ndarray
    lam: np.ndarray
    moments: Optional[Moments] = None
    final: Optional[Moments] = None


def sampling_pass(
    diffusion: GaussianDiffusion,
    model: ModelFn,
    x0: torch.Tensor,
    seeds: Sequence[int],
    *,
    sampler: str = "ddpm",
    clip_denoised: bool = True,
    model_kwargs: Optional[dict] = None,
    with_moments: bool = False,
) -> PassResult:
    """Consecutive sampling from ``x̂_{t_{K-1}} = q_sample(x_0, t_{K-1})`` with the diffusion's
    own lambda schedule, recording the network's raw eps norm on every state it is fed and,
    optionally, the residual moments for delta_t (see the module doc for the rows).

    x_T and every step's noise come from ``seeds`` (stream ``STREAM_SAMPLE``), so passes with
    different lambda on the same seeds differ only through lambda.
    """
    check_eps_model(diffusion)
    n, dev = x0.shape[0], x0.device
    K = diffusion.num_timesteps
    noise = PerSampleNoise(seeds, STREAM_SAMPLE, x0.shape[1:], dev)
    x_start = diffusion.q_sample(x0, _steps(n, K - 1, dev), noise=noise())
    sqrt_ab = _sqrt_alphas_cumprod(diffusion, dev)
    norms: List[Optional[torch.Tensor]] = [None] * K
    stats: List[Any] = [None] * K  # per row: (mean, m2) of the residual, on the device
    last = None
    for out in diffusion.sample_loop_progressive(
        model,
        x0.shape,
        sampler=sampler,
        noise=x_start,
        clip_denoised=clip_denoised,
        model_kwargs=model_kwargs,
        device=dev,
        noise_fn=noise,
    ):
        i = int(out["t"][0])
        norms[i] = _flat_norm(out["eps"])
        if with_moments:
            stats[i] = _residual_stats(out["x_t"], sqrt_ab[i], x0)
        last = out["sample"]
    result = PassResult(
        eps_norm=torch.stack(norms, dim=1).double().cpu().numpy(),
        lam=np.asarray(diffusion.eps_scale, dtype=np.float64).copy(),
    )
    if with_moments:
        result.moments = Moments.stack(n, stats)  # K rows
        result.final = Moments.stack(n, [_residual_stats(last, 1.0, x0)])
    return result


def each_step_pass(
    diffusion: GaussianDiffusion,
    model: ModelFn,
    x0: torch.Tensor,
    seeds: Sequence[int],
    *,
    sampler: str = "ddpm",
    clip_denoised: bool = True,
    model_kwargs: Optional[dict] = None,
) -> Tuple[Moments, Moments]:
    """The paper's "each step" variant: at every step i one reverse step from a true
    ``x_{t_i} = q_sample(x_0, t_i)``; isolates a single step's error.

    :return: (moments of the K rows, moments of the final x̂_0 - x_0); row i < K-1 is the
        output of step i + 1, row K-1 the true forward sample (see the module doc).
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    n, dev = x0.shape[0], x0.device
    K = diffusion.num_timesteps
    noise = PerSampleNoise(seeds, STREAM_EACH, x0.shape[1:], dev)
    sqrt_ab = _sqrt_alphas_cumprod(diffusion, dev)
    stats: List[Any] = [None] * K  # per row: (mean, m2) of the residual, on the device
    final = None
    step_kwargs = dict(clip_denoised=clip_denoised, model_kwargs=model_kwargs)
    with torch.no_grad():
        for i in reversed(range(K)):
            t = _steps(n, i, dev)
            x_t = diffusion.q_sample(x0, t, noise=noise())
            step_noise = noise()  # drawn for both samplers: the streams stay aligned
            if i == K - 1:
                stats[i] = _residual_stats(x_t, sqrt_ab[i], x0)
            if sampler == "ddpm":
                out = diffusion.p_sample(model, x_t, t, noise=step_noise, **step_kwargs)
            else:
                out = diffusion.ddim_sample(model, x_t, t, eta=0.0, **step_kwargs)
            if i > 0:
                stats[i - 1] = _residual_stats(out["sample"], sqrt_ab[i - 1], x0)
            else:
                final = _residual_stats(out["sample"], 1.0, x0)
    return Moments.stack(n, stats), Moments.stack(n, [final])


def delta_curve(
    moments: Moments, final: Moments, alphas_cumprod: np.ndarray
) -> Dict[str, np.ndarray]:
    """delta_t of the paper from the residual moments of ``sampling_pass``/``each_step_pass``.

    ``sigma_hat_i`` = mean over C x H x W of the per-pixel std over samples of
    ``x̂_i - sqrt(abar_i) x_0``; ``expected_sigma_i = sqrt(1 - abar_i)``;
    ``delta_i = (sigma_hat_i - expected_sigma_i)^2``.

    :return: ``sigma_hat``, ``expected_sigma``, ``delta`` (K,), by step index i, and
        ``final_sigma_hat`` (scalar array): the spread of x̂_0 - x_0 (expected 0).
    """
    std = moments.std()  # (K, C, H, W)
    sigma_hat = std.reshape(std.shape[0], -1).mean(axis=1)
    expected = np.sqrt(1.0 - np.asarray(alphas_cumprod, dtype=np.float64))
    return {
        "sigma_hat": sigma_hat,
        "expected_sigma": expected,
        "delta": (sigma_hat - expected) ** 2,
        "final_sigma_hat": np.asarray(final.std().mean()),
    }


def lambda_curves(
    diffusion: GaussianDiffusion,
    model: ModelFn,
    x0: torch.Tensor,
    seeds: Sequence[int],
    lambdas: Sequence[float],
    *,
    model_kwargs: Optional[dict] = None,
    sampler: str = "ddpm",
) -> Tuple[Dict[str, np.ndarray], Dict[float, Dict[str, np.ndarray]]]:
    """The paper's two views of exposure bias at several uniform eps scalers, on one batch.

    :return: (mean eps-norm curves by step index i: ``training`` and one ``sampling, lambda
        L`` per lambda, the norm of eps / lambda; the ``delta_curve`` of each lambda). Every
        lambda samples from the same x_T and noise.
    """
    curves = {"training": train_eps_norms(diffusion, model, x0, seeds, model_kwargs=model_kwargs)}
    deltas = {}
    for lam in lambdas:
        res = sampling_pass(
            diffusion.with_eps_scaler(lam),
            model,
            x0,
            seeds,
            sampler=sampler,
            model_kwargs=model_kwargs,
            with_moments=True,
        )
        curves[f"sampling, lambda {lam:g}"] = res.eps_norm / res.lam
        deltas[lam] = delta_curve(res.moments, res.final, diffusion.alphas_cumprod)
    return {k: v.mean(axis=0) for k, v in curves.items()}, deltas


def relative_gap(sample_norm: np.ndarray, train_norm: np.ndarray) -> np.ndarray:
    """g_i = S_i / T_i - 1: the relative excess of the sampling curve over the training curve."""
    return np.asarray(sample_norm, dtype=np.float64) / np.asarray(train_norm, dtype=np.float64) - 1


def file_rows(diffusion: GaussianDiffusion, curves: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Curves indexed by step i (last axis) in file row order: ``step`` and ``t`` columns
    first, then every curve, rows from the noisiest step (i = K-1) to the last (i = 0);
    scalars pass through."""
    order = np.arange(diffusion.num_timesteps)[::-1]
    rows = {"step": order, "t": original_timesteps(diffusion)[order]}
    rows.update({k: np.asarray(v)[..., order] if np.ndim(v) else v for k, v in curves.items()})
    return rows


# ----------------------------------------------------------------------------- moved names
# The calibration and the figures used to live here. ``calibration`` imports this module,
# so its names are re-exported on first use (PEP 562) rather than at import time.

_MOVED = {
    **dict.fromkeys(
        (
            "OBJECTIVE",
            "CalibrationResult",
            "Evaluation",
            "calibrate",
            "find_root_1d",
            "gap_standard_error",
            "gap_stats",
        ),
        "calibration",
    ),
    **dict.fromkeys(("plot_calibration", "plot_delta", "plot_eps_norm"), "plots"),
    **dict.fromkeys(("write_csv", "read_train_norm"), "io_util"),
    **dict.fromkeys(("data_share", "count_images"), "image_datasets"),
    **dict.fromkeys(("gather_rows",), "dist_util"),
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(f".{_MOVED[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
