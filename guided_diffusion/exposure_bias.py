"""Exposure-bias measurements and Epsilon Scaling calibration (Ning et al., ICLR 2024).

The three quantities of "Elucidating the Exposure Bias in Diffusion Models", computed with
plain tensor functions (no logging, no file I/O inside the math; results leave as numpy
arrays):

* the epsilon L2-norm per sampling step (Sec. "Epsilon L2-norm" of the paper): the
  *training* curve ``T_i = E ||eps_theta(x_t, t)||`` with ``x_t ~ q(x_t | x_0)`` and the
  *sampling* curve ``S_i = E ||eps_theta(x̂_t, t) / lambda_i||`` along consecutive sampling;
* ``delta_t = (sigma_hat_t - sqrt(1 - abar_t))^2`` (Sec. "Metric delta_t"), where
  ``sigma_hat_t`` is the per-pixel standard deviation over the N samples of
  ``x̂_t - sqrt(abar_t) x_0``, averaged over C x H x W;
* the Epsilon Scaling schedule ``lambda_i = k * i + b`` that brings the sampling curve onto
  the training curve (``calibrate``).

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
on the CPU, so the result of a sample depends on neither the batch it is in, the number of
processes, nor the device.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion, ModelMeanType

ModelFn = Callable[..., torch.Tensor]
# (b, k) -> the sampling diffusion with lambda_i = k * i + b
DiffusionFactory = Callable[[float, float], GaussianDiffusion]
# (local per-sample rows) -> the rows of every process, in global sample order
GatherFn = Callable[[np.ndarray], np.ndarray]

STREAM_TRAIN = 0  # the q(x_t | x_0) noise of the training curve, one draw per step
STREAM_SAMPLE = 1  # x_T, then the per-step DDPM noise of consecutive sampling
STREAM_EACH = 2  # each_step mode: forward noise and step noise for every step

OBJECTIVE = (
    "closed-loop epsilon-norm matching: g_i(k, b) = S_i / T_i - 1 with "
    "S_i = mean_n ||eps_theta(x_hat_i, t_i) / lambda_i|| along the trajectory sampled WITH "
    "lambda_i = k*i + b (same x_T and noise for every candidate) and T_i = "
    "mean_n ||eps_theta(x_t_i, t_i)||, x_t_i ~ q(x_t_i | x_0); uniform: b with "
    "mean_i g_i = 0; linear: (k, b) with mean_i g_i = 0 and zero least-squares slope of "
    "g_i against i/(K-1); i over the included steps"
)


# ----------------------------------------------------------------------------- seeds and noise


def sample_seeds(seed: int, indices: Iterable[int]) -> List[int]:
    """One 63-bit seed per sample from the run seed and the sample's global index."""
    from .sample_util import batch_seed

    return [batch_seed(seed, j) for j in indices]


def _stream_seed(seed: int, stream: int) -> int:
    state = np.random.SeedSequence([int(seed) & (2**63 - 1), 0xE5, stream]).generate_state(2)
    return int((int(state[0]) << 32 | int(state[1])) & (2**63 - 1))


class PerSampleNoise:
    """Standard normal noise for a batch, drawn sample by sample from per-sample generators.

    Calling it returns the next (N, *shape) draw on ``device``; sample n's draws depend only
    on ``seeds[n]`` and ``stream``. Usable as the ``noise_fn`` of ``sample_loop_progressive``.
    """

    def __init__(
        self,
        seeds: Sequence[int],
        stream: int,
        shape: Sequence[int],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.gens = [torch.Generator().manual_seed(_stream_seed(s, stream)) for s in seeds]
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


def as_factory(diffusion: Union[GaussianDiffusion, DiffusionFactory]) -> DiffusionFactory:
    """Turn a diffusion (or a ``(b, k) -> diffusion`` factory) into a factory."""
    if isinstance(diffusion, GaussianDiffusion):
        return diffusion.with_eps_scaler
    return diffusion


def diffusion_factory(**kwargs: Any) -> DiffusionFactory:
    """``(b, k) -> create_gaussian_diffusion(**kwargs, eps_scaler=b, eps_scaler_k=k)``."""
    from .script_util import create_gaussian_diffusion

    return lambda b, k: create_gaussian_diffusion(**kwargs, eps_scaler=b, eps_scaler_k=k)


def _check_eps_model(diffusion: GaussianDiffusion) -> None:
    if diffusion.model_mean_type != ModelMeanType.EPSILON:
        raise ValueError("epsilon norms need an eps-prediction model: use --predict_xstart False")


def _steps(n: int, i: int, device: torch.device) -> torch.Tensor:
    return torch.full((n,), i, device=device, dtype=torch.long)


def _flat_norm(x: torch.Tensor) -> torch.Tensor:
    return x.float().flatten(1).norm(dim=1)  # (N,)


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
    _check_eps_model(diffusion)
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
    _check_eps_model(diffusion)
    n, dev = x0.shape[0], x0.device
    K = diffusion.num_timesteps
    noise = PerSampleNoise(seeds, STREAM_SAMPLE, x0.shape[1:], dev)
    x_start = diffusion.q_sample(x0, _steps(n, K - 1, dev), noise=noise())
    sqrt_ab = torch.from_numpy(np.sqrt(diffusion.alphas_cumprod)).to(dev)
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
            stats[i] = _row_stats(out["x_t"].double() - sqrt_ab[i] * x0.double())
        last = out["sample"]
    result = PassResult(
        eps_norm=torch.stack(norms, dim=1).double().cpu().numpy(),
        lam=np.asarray(diffusion.eps_scale, dtype=np.float64).copy(),
    )
    if with_moments:
        result.moments = Moments.stack(n, stats)  # K rows
        result.final = Moments.stack(n, [_row_stats(last.double() - x0.double())])
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
    sqrt_ab = torch.from_numpy(np.sqrt(diffusion.alphas_cumprod)).to(dev)
    stats: List[Any] = [None] * K  # per row: (mean, m2) of the residual, on the device
    final = None
    with torch.no_grad():
        for i in reversed(range(K)):
            t = _steps(n, i, dev)
            x_t = diffusion.q_sample(x0, t, noise=noise())
            step_noise = noise()  # drawn for both samplers: the streams stay aligned
            if i == K - 1:
                stats[i] = _row_stats(x_t.double() - sqrt_ab[i] * x0.double())
            kwargs = dict(clip_denoised=clip_denoised, model_kwargs=model_kwargs)
            if sampler == "ddpm":
                out = diffusion.p_sample(model, x_t, t, noise=step_noise, **kwargs)
            else:
                out = diffusion.ddim_sample(model, x_t, t, eta=0.0, **kwargs)
            if i > 0:
                stats[i - 1] = _row_stats(out["sample"].double() - sqrt_ab[i - 1] * x0.double())
            else:
                final = _row_stats(out["sample"].double() - x0.double())
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


# ----------------------------------------------------------------------------- the objective


def relative_gap(sample_norm: np.ndarray, train_norm: np.ndarray) -> np.ndarray:
    """g_i = S_i / T_i - 1: the relative excess of the sampling curve over the training curve."""
    return np.asarray(sample_norm, dtype=np.float64) / np.asarray(train_norm, dtype=np.float64) - 1


def _projection(include: np.ndarray) -> np.ndarray:
    """(2, K) rows giving the mean of g over the included steps and its least-squares slope
    against x_i = i / (K-1) (the slope row is zero with fewer than 2 included steps)."""
    K = include.shape[0]
    x = np.arange(K) / max(K - 1, 1)
    w = include.astype(np.float64)
    m = w.sum()
    mean_row = w / m
    xc = (x - (w * x).sum() / m) * w
    denom = (xc * x).sum()
    slope_row = xc / denom if denom > 0 else np.zeros(K)
    return np.stack([mean_row, slope_row])


def gap_stats(g: np.ndarray, include: np.ndarray) -> Tuple[float, float, float]:
    """(signed mean, RMS, slope against i/(K-1)) of the relative gap over the included steps."""
    proj = _projection(include) @ g
    rms = float(np.sqrt(np.mean(g[include] ** 2)))
    return float(proj[0]), rms, float(proj[1])


def find_root_1d(
    f: Callable[[float], float],
    x0: float,
    f0: float,
    x1: float,
    lo: float,
    hi: float,
    tol: float,
    max_evals: int,
) -> Tuple[float, str]:
    """A root of ``f`` in [lo, hi] by the secant method, safeguarded by bisection once a sign
    change is bracketed.

    ``x0`` (with its known value ``f0``) and ``x1`` start the secant; later iterates are
    clamped to [lo, hi]. Stops when the next step is below ``tol``, the bracket is narrower
    than ``tol``, or ``max_evals`` values (including ``f0``) were used.

    :return: (the evaluated x with the smallest |f|, status): ``converged`` (a step or
        bracket below ``tol``, or f = 0), ``at_bound`` (no sign change, the best x is on a
        bound: the root is probably outside [lo, hi]), ``no_root`` (no sign change found,
        e.g. |f| has a minimum above 0), or ``max_evals``.
    """
    pts: List[Tuple[float, float]] = [(x0, f0)]
    x = float(min(max(x1, lo), hi))
    status = "max_evals"
    if f0 == 0:
        return x0, "converged"
    while len(pts) < max_evals:
        if any(abs(x - p) < 1e-15 for p, _ in pts):
            status = "stuck"  # x1 clamped onto x0
            break
        fx = f(x)
        pts.append((x, fx))
        if fx == 0:
            status = "converged"
            break
        ordered = sorted(pts)
        bracket = None
        for (a, fa), (b, fb) in zip(ordered, ordered[1:]):
            if fa * fb < 0 and (bracket is None or b - a < bracket[1] - bracket[0]):
                bracket = (a, b)
        (xa, fa), (xb, fb) = pts[-2], pts[-1]
        nxt = xb - fb * (xb - xa) / (fb - fa) if fb != fa else math.nan
        if bracket is not None:
            if bracket[1] - bracket[0] < tol:
                status = "converged"
                break
            if not bracket[0] < nxt < bracket[1]:
                nxt = 0.5 * (bracket[0] + bracket[1])
        elif not math.isfinite(nxt):
            status = "stuck"
            break
        nxt = float(min(max(nxt, lo), hi))
        if any(abs(nxt - p) < 1e-15 for p, _ in pts):
            status = "stuck"  # clamped onto a point already evaluated
            break
        if abs(nxt - xb) < tol:
            status = "converged"
            break
        x = nxt
    best = min(pts, key=lambda p: abs(p[1]))
    has_sign_change = len({np.sign(v) for _, v in pts if v != 0}) > 1
    if not has_sign_change and status != "converged" or status == "stuck":
        status = "at_bound" if best[0] <= lo or best[0] >= hi else "no_root"
    return best[0], status


# ----------------------------------------------------------------------------- calibration


@dataclass
class Evaluation:
    """One closed-loop sampling pass at lambda_i = k * i + b."""

    k: float
    b: float
    phase: str  # "baseline", "uniform" or "linear"
    sample_norm: np.ndarray  # (K,) mean ||eps_theta / lambda_i|| by step index i
    gap_per_step: np.ndarray  # (K,) g_i
    gap: float  # signed mean of g_i over the included steps (the uniform objective)
    rms_gap: float
    slope: float  # least-squares slope of g_i against i / (K-1) over the included steps
    gap_se: float  # standard error of ``gap`` from the spread over samples

    def summary(self) -> Dict[str, Any]:
        keys = ("k", "b", "gap", "gap_se", "rms_gap", "slope", "phase")
        return {key: getattr(self, key) for key in keys}


@dataclass
class CalibrationResult:
    """The fitted uniform b and linear (k, b), with every curve behind them.

    ``uniform_gain`` is d(mean gap)/db at the uniform fit (closed loop; an open-loop
    rescaling of eps would give about -1): a small gain means the sampling curve hardly
    moves with lambda, so statistical noise in the gap moves b a lot; ``uniform_b_se``
    = gap standard error / |gain| is the resulting standard error of b.
    """

    steps: int
    timesteps: np.ndarray  # (K,) t_i
    included: np.ndarray  # (K,) bool: the steps in the objective
    num_samples: int
    sampler: str
    train_norm: np.ndarray  # (K,) T_i
    baseline: Evaluation  # lambda = 1
    uniform: Evaluation
    linear: Evaluation
    evaluations: List[Evaluation] = field(default_factory=list)
    uniform_status: str = "converged"
    uniform_gain: float = math.nan
    uniform_b_se: float = math.nan
    linear_status: str = "converged"
    b_range: Tuple[float, float] = (0.95, 1.10)

    def flags(self, which: str) -> str:
        """The sampling flags of the ``uniform`` or ``linear`` fit, ready to paste."""
        if which == "uniform":
            return f"--eps_scaler {self.uniform.b:.6g} --eps_scaler_k 0"
        return f"--eps_scaler {self.linear.b:.6g} --eps_scaler_k {self.linear.k:.6g}"

    def to_json(self) -> Dict[str, Any]:
        """Everything as plain JSON types (non-finite numbers become None)."""
        excluded = [int(i) for i in np.flatnonzero(~self.included)]
        return _json_safe(
            {
                "uniform": {
                    "b": self.uniform.b,
                    "gap": self.uniform.gap,
                    "gap_se": self.uniform.gap_se,
                    "rms_gap": self.uniform.rms_gap,
                    "gain": self.uniform_gain,
                    "b_se": self.uniform_b_se,
                    "status": self.uniform_status,
                    "flags": self.flags("uniform"),
                },
                "linear": {
                    "k": self.linear.k,
                    "b": self.linear.b,
                    "gap": self.linear.gap,
                    "rms_gap": self.linear.rms_gap,
                    "slope": self.linear.slope,
                    "status": self.linear_status,
                    "flags": self.flags("linear"),
                },
                "baseline": {
                    "gap": self.baseline.gap,
                    "gap_se": self.baseline.gap_se,
                    "rms_gap": self.baseline.rms_gap,
                },
                "steps": self.steps,
                "timesteps": [int(t) for t in self.timesteps],
                "excluded_steps": excluded,
                "num_samples": self.num_samples,
                "sampler": self.sampler,
                "b_range": list(self.b_range),
                "objective": OBJECTIVE,
                "evaluations": [e.summary() for e in self.evaluations],
                "train_norm": [float(v) for v in self.train_norm],
            }
        )

    def curves(self) -> Dict[str, np.ndarray]:
        """Every curve by step index i (K,), plus the per-evaluation curves (E, K)."""
        return {
            "step": np.arange(self.steps),
            "t": self.timesteps,
            "included": self.included,
            "train_norm": self.train_norm,
            "sample_norm_baseline": self.baseline.sample_norm,
            "sample_norm_uniform": self.uniform.sample_norm,
            "sample_norm_linear": self.linear.sample_norm,
            "eval_k": np.array([e.k for e in self.evaluations]),
            "eval_b": np.array([e.b for e in self.evaluations]),
            "eval_gap": np.array([e.gap for e in self.evaluations]),
            "eval_sample_norm": np.stack([e.sample_norm for e in self.evaluations]),
        }


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _chunks(n: int, batch_size: Optional[int]) -> List[slice]:
    size = n if not batch_size else max(1, int(batch_size))
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def _slice_kwargs(model_kwargs: Optional[dict], sl: slice) -> dict:
    return {k: v[sl] for k, v in (model_kwargs or {}).items()}


def gap_standard_error(
    sample_rows: np.ndarray,
    train_norm: np.ndarray,
    include: np.ndarray,
    train_rows: Optional[np.ndarray] = None,
) -> float:
    """Standard error of the mean relative gap over samples (delta method).

    ``sample_rows`` (N, K) per-sample ``||eps / lambda_i||``; ``train_rows`` (N, K) the
    per-sample training norms of the same x_0 (None: the training curve is taken as exact).
    The influence of sample n is ``mean_i [(S_ni - S_i) / T_i - S_i (T_ni - T_i) / T_i^2]``.
    """
    n = sample_rows.shape[0]
    if n < 2:
        return math.nan
    T = np.asarray(train_norm, dtype=np.float64)
    S = sample_rows.mean(axis=0)
    psi = (sample_rows - S) / T
    if train_rows is not None:
        psi = psi - S * (train_rows - T) / T**2
    psi = psi[:, include].mean(axis=1)
    return float(psi.std(ddof=1) / math.sqrt(n))


def calibrate(
    model: ModelFn,
    diffusion: Union[GaussianDiffusion, DiffusionFactory],
    x0: torch.Tensor,
    *,
    seeds: Optional[Sequence[int]] = None,
    model_kwargs: Optional[dict] = None,
    sampler: str = "ddpm",
    clip_denoised: bool = True,
    exclude_steps: Sequence[int] = (0,),
    b_range: Tuple[float, float] = (0.95, 1.10),
    tol: float = 1e-4,
    max_evals: int = 8,
    max_evals_linear: int = 5,
    batch_size: Optional[int] = None,
    train_norm: Optional[np.ndarray] = None,
    gather: Optional[GatherFn] = None,
    callback: Optional[Callable[[Evaluation], None]] = None,
) -> CalibrationResult:
    """Fit Epsilon Scaling so that the sampling eps-norm curve lies on the training curve.

    Objective (closed loop, ``OBJECTIVE``): for a candidate lambda_i = k i + b the batch is
    sampled WITH that lambda, from the same x_T and noise for every candidate, and
    ``g_i = S_i / T_i - 1`` compares ``S_i = mean ||eps_theta(x̂_i) / lambda_i||`` with the
    training curve ``T_i``, over the steps not in ``exclude_steps`` (default: the last step
    i = 0, an outlier at every lambda).

    * uniform b: the root of ``mean_i g_i(b)``, by the secant method started from lambda = 1
      and the open-loop guess ``b = 1 + mean_i g_i(1)``, safeguarded by bisection, clamped
      to ``b_range``, to ``tol`` in b (``find_root_1d``);
    * linear (k, b): the root of F = (mean of g_i, least-squares slope of g_i against
      i/(K-1)), in the parameters (b, d = k (K-1)) (the lambdas at both ends), by Broyden's
      method from (0, b_uniform). Its initial Jacobian is closed loop: the b column from the
      last two uniform passes, the d column from one probe pass at d = +-0.02; each further
      pass updates it. Stops at a step below ``tol`` or after ``max_evals_linear`` passes,
      returning the pass with the smallest |F|.

    Each pass costs K network calls per sample; a typical run is one baseline pass, 3-5
    uniform and 2-4 linear passes, plus the training curve (K calls per sample).

    :param diffusion: the sampling diffusion (its lambda is ignored) or a ``(b, k) ->
        diffusion`` factory.
    :param x0: (N, C, H, W) data batch (this process's share when ``gather`` is given).
    :param seeds: per-sample seeds (default ``sample_seeds(0, range(N))``).
    :param batch_size: split the network calls into chunks of this many samples.
    :param train_norm: a precomputed reference curve T (K,); computed from ``x0`` if None.
    :param gather: combines per-sample rows (N_local, K) of all processes in global order
        (every process then takes the same decisions); None for a single process.
    :param callback: called with every new ``Evaluation`` (progress output).
    """
    factory = as_factory(diffusion)
    base = factory(1.0, 0.0)
    _check_eps_model(base)
    K = base.num_timesteps
    lo, hi = float(b_range[0]), float(b_range[1])
    if not 0 < lo < hi:
        raise ValueError(f"b_range must satisfy 0 < lo < hi, got {lo}, {hi}")
    include = np.ones(K, dtype=bool)
    for i in exclude_steps:
        if not 0 <= int(i) < K:
            raise ValueError(f"excluded step {i} is outside 0..{K - 1}")
        include[int(i)] = False
    if not include.any():
        raise ValueError(f"every one of the {K} steps is excluded: nothing to calibrate on")
    n_local = x0.shape[0]
    if seeds is None:
        seeds = sample_seeds(0, range(n_local))
    if len(seeds) != n_local:
        raise ValueError(f"{len(seeds)} seeds for {n_local} samples")
    chunks = _chunks(n_local, batch_size)
    gather = gather or (lambda rows: rows)

    def per_sample(fn: Callable[[torch.Tensor, Sequence[int], dict], np.ndarray]) -> np.ndarray:
        parts = [fn(x0[sl], seeds[sl], _slice_kwargs(model_kwargs, sl)) for sl in chunks]
        local = np.concatenate(parts, axis=0) if parts else np.zeros((0, K))
        return gather(local)

    train_rows = None
    if train_norm is None:
        train_rows = per_sample(
            lambda x, s, kw: train_eps_norms(base, model, x, s, model_kwargs=kw)
        )
        train_norm = train_rows.mean(axis=0)
    train_norm = np.asarray(train_norm, dtype=np.float64)
    if train_norm.shape != (K,):
        raise ValueError(f"train_norm must have shape ({K},), got {train_norm.shape}")
    bad = np.flatnonzero(~(np.isfinite(train_norm) & (train_norm > 0)))
    if bad.size:
        raise ValueError(
            f"the training eps norm is zero or not finite at steps {bad.tolist()} "
            "(an untrained model outputs 0): nothing to match"
        )

    evaluations: List[Evaluation] = []
    cache: Dict[Tuple[float, float], Evaluation] = {}
    num_samples = [0]

    def evaluate(k: float, b: float, phase: str) -> Evaluation:
        key = (float(k), float(b))
        if key in cache:
            return cache[key]
        diff = factory(float(b), float(k))
        lam = np.asarray(diff.eps_scale, dtype=np.float64)
        rows = per_sample(
            lambda x, s, kw: (
                sampling_pass(
                    diff, model, x, s, sampler=sampler, clip_denoised=clip_denoised, model_kwargs=kw
                ).eps_norm
            )
        )
        rows = rows / lam  # ||eps / lambda_i|| per sample
        num_samples[0] = rows.shape[0]
        sample_norm = rows.mean(axis=0)
        g = relative_gap(sample_norm, train_norm)
        mean, rms, slope = gap_stats(g, include)
        if not math.isfinite(mean):
            raise ValueError(
                f"sampling with lambda_i = {k:g} * i + {b:g} gave non-finite eps norms"
            )
        se = gap_standard_error(rows, train_norm, include, train_rows)
        ev = Evaluation(float(k), float(b), phase, sample_norm, g, mean, rms, slope, se)
        cache[key] = ev
        evaluations.append(ev)
        if callback is not None:
            callback(ev)
        return ev

    # --- uniform b
    baseline = evaluate(0.0, 1.0, "baseline")
    b_star, status = find_root_1d(
        lambda b: evaluate(0.0, b, "uniform").gap,
        1.0,
        baseline.gap,
        1.0 + baseline.gap,
        lo,
        hi,
        tol,
        max_evals,
    )
    uniform = evaluate(0.0, b_star, "uniform")
    near = _nearest_uniform(evaluations, uniform)
    gain = (near.gap - uniform.gap) / (near.b - uniform.b) if near is not None else math.nan

    # --- linear (k, b)
    if int(include.sum()) < 2 or K < 2:
        linear, lin_status = uniform, "not identifiable (fewer than 2 included steps): k = 0"
    else:
        linear, lin_status = _fit_linear(
            evaluate, uniform, near, include, K, lo, hi, tol, max_evals_linear
        )
    return CalibrationResult(
        steps=K,
        timesteps=original_timesteps(base),
        included=include,
        num_samples=num_samples[0],
        sampler=sampler,
        train_norm=train_norm,
        baseline=baseline,
        uniform=uniform,
        linear=linear,
        evaluations=evaluations,
        uniform_status=status,
        uniform_gain=float(gain),
        uniform_b_se=float(uniform.gap_se / abs(gain)) if gain else math.nan,
        linear_status=lin_status,
        b_range=(lo, hi),
    )


def _nearest_uniform(evaluations: List[Evaluation], ev: Evaluation) -> Optional[Evaluation]:
    """The other uniform (k = 0) pass closest in b to ``ev`` (None if there is none)."""
    others = [e for e in evaluations if e.k == 0.0 and e.b != ev.b]
    return min(others, key=lambda e: abs(e.b - ev.b)) if others else None


def _fit_linear(
    evaluate: Callable[[float, float, str], Evaluation],
    start: Evaluation,
    near: Optional[Evaluation],
    include: np.ndarray,
    K: int,
    lo: float,
    hi: float,
    tol: float,
    max_evals: int,
) -> Tuple[Evaluation, str]:
    """Broyden's method on F(b, d) = P g(k = d / (K-1), b) (see ``calibrate``)."""
    P = _projection(include)  # (2, K)
    F = P @ start.gap_per_step
    if near is not None:
        col_b = (P @ near.gap_per_step - F) / (near.b - start.b)
    else:  # open loop: g_i ~ (1 + g_i) b / lambda_i - 1
        col_b = P @ (-(1.0 + start.gap_per_step) / start.b)
    h = 0.02 if start.b + 0.02 <= hi else -0.02
    probe = evaluate(h / (K - 1), start.b, "linear")
    F_probe = P @ probe.gap_per_step
    J = np.stack([col_b, (F_probe - F) / h], axis=1)  # (2, 2): columns d/db, d/dd
    evals = [(start, np.array([start.b, 0.0]), F), (probe, np.array([start.b, h]), F_probe)]
    p, Fp = evals[-1][1], F_probe
    status = f"max_evals ({max_evals} linear passes)"
    for _ in range(max_evals - 1):
        try:
            step = -np.linalg.solve(J, Fp)
        except np.linalg.LinAlgError:
            step = -np.linalg.lstsq(J, Fp, rcond=None)[0]
        step = np.clip(step, -0.1, 0.1)  # a trust region of 0.1 in lambda
        new = p + step
        new[0] = min(max(new[0], lo), hi)  # lambda_0 = b and lambda_{K-1} = b + d in range
        new[1] = min(max(new[0] + new[1], lo), hi) - new[0]
        dp = new - p
        if np.max(np.abs(dp)) < tol:
            status = "converged"
            break
        ev = evaluate(new[1] / (K - 1), new[0], "linear")
        F_new = P @ ev.gap_per_step
        J = J + np.outer(F_new - Fp - J @ dp, dp) / float(dp @ dp)
        p, Fp = new, F_new
        evals.append((ev, new, F_new))
    best = min(evals, key=lambda e: float(np.linalg.norm(e[2])))
    return best[0], status


# ----------------------------------------------------------------------------- tables and files
# (output helpers for the scripts; the measurement math above does no I/O)


def write_csv(path: Union[str, os.PathLike], columns: Dict[str, np.ndarray]) -> None:
    """A CSV with the given columns (integer arrays as ints, floats with 9 digits)."""
    names = list(columns)
    cols = [np.asarray(columns[k]) for k in names]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for r in range(len(cols[0])):
            w.writerow(
                [
                    int(c[r]) if np.issubdtype(c.dtype, np.integer) else f"{float(c[r]):.9g}"
                    for c in cols
                ]
            )


def read_csv(path: Union[str, os.PathLike]) -> Dict[str, np.ndarray]:
    """Columns of a CSV written by ``write_csv`` as float64 arrays."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return {name: np.array([float(r[j]) for r in rows[1:]]) for j, name in enumerate(rows[0])}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_eps_norm(
    path: Union[str, os.PathLike],
    t: np.ndarray,
    curves: Dict[str, np.ndarray],
    title: str,
    excluded: Optional[np.ndarray] = None,
) -> None:
    """Eps-norm curves against the original timestep (sampling order, left to right) and
    their relative gap to the first curve (the training curve)."""
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True, height_ratios=(2, 1))
    ref_name = next(iter(curves))
    ref = curves[ref_name]
    for name, c in curves.items():
        style = dict(lw=2, color="black") if name == ref_name else dict(lw=1.3, marker=".")
        ax.plot(t, c, label=name, **style)
        if name != ref_name:
            ax2.plot(t, 100 * relative_gap(c, ref), marker=".", lw=1.3, label=name)
    if excluded is not None and np.any(excluded):
        for tt in np.asarray(t)[np.asarray(excluded)]:
            ax2.axvline(tt, color="0.5", ls=":", lw=1.5)
    ax2.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("mean ||eps||_2 per image")
    ax2.set_ylabel(f"gap to {ref_name} (%)")
    ax2.set_xlabel("timestep t (noisy -> clean)")
    ax.invert_xaxis()
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_delta(
    path: Union[str, os.PathLike],
    t: np.ndarray,
    expected: np.ndarray,
    runs: Dict[str, Dict[str, np.ndarray]],
    title: str,
) -> None:
    """sigma_hat_t against sqrt(1 - abar_t), and delta_t, for one or more lambda settings."""
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    ax.plot(t, expected, color="black", lw=2, label="sqrt(1 - abar_t)")
    for name, r in runs.items():
        ax.plot(t, r["sigma_hat"], marker=".", lw=1.3, label=f"sigma_hat, {name}")
        ax2.plot(t, r["delta"], marker=".", lw=1.3, label=name)
    ax.set_ylabel("std of x̂_t - sqrt(abar_t) x_0")
    ax2.set_ylabel("delta_t")
    ax2.set_yscale("symlog", linthresh=1e-4)
    ax2.set_xlabel("timestep t (noisy -> clean)")
    ax.invert_xaxis()
    ax.set_title(title, fontsize=10)
    for a in (ax, ax2):
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_calibration(path: Union[str, os.PathLike], result: CalibrationResult) -> None:
    """Training curve and the sampling curves at lambda = 1, at uniform b and at linear (k, b)."""
    u, lin = result.uniform, result.linear
    curves = {
        "training": result.train_norm,
        "sampling, lambda = 1": result.baseline.sample_norm,
        f"sampling, b = {u.b:.4f}": u.sample_norm,
        f"sampling, k = {lin.k:.2e}, b = {lin.b:.4f}": lin.sample_norm,
    }
    order = np.arange(result.steps)[::-1]
    plot_eps_norm(
        path,
        result.timesteps[order],
        {k: v[order] for k, v in curves.items()},
        f"eps_scaler calibration: {result.steps} steps ({result.sampler}), "
        f"{result.num_samples} samples; dotted: steps excluded from the fit",
        excluded=~result.included[order],
    )


# ----------------------------------------------------------------------------- script plumbing
# (shared by scripts/eps_norm.py, exposure_bias.py, calibrate_eps_scaler.py)


def measurement_defaults(num_samples: int, batch_size: int) -> Dict[str, Any]:
    """The data and run flags of the three exposure-bias scripts: the sampling scripts' run
    flags plus ``data_dir`` (model flags come from ``model_and_diffusion_defaults``)."""
    from .sample_util import sampling_defaults

    shared = sampling_defaults()
    keys = ("use_ddim", "clip_denoised", "model_path", "seed", "log_dir", "progress")
    return dict(
        data_dir="",
        num_samples=num_samples,
        batch_size=batch_size,
        **{k: shared[k] for k in keys},
    )


def measurement_help() -> Dict[str, str]:
    """Help text of ``measurement_defaults``' flags."""
    from .sample_util import SAMPLING_HELP

    return dict(
        SAMPLING_HELP,
        data_dir="images x_0: an image folder or an .npz file (arr_0 uint8 NHWC, arr_1 "
        "labels); the first --num_samples are used",
        num_samples="number of data images (samples) to measure",
        batch_size="images per network call on each process",
        seed="base seed; sample j draws all its noise from generators seeded by (seed, j)",
    )


def count_images(data_dir: str) -> int:
    """Number of images in an image folder or in the ``arr_0`` of an ``.npz`` file."""
    from .image_datasets import DataError, list_image_files_recursively

    if os.path.isdir(data_dir):
        return len(list_image_files_recursively(data_dir))
    try:
        with zipfile.ZipFile(data_dir) as zf, zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            reader = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            return int(reader(f)[0][0])
    except Exception as e:  # noqa: BLE001 - any zip or header failure means a bad file
        raise DataError(f"cannot read {data_dir}: {e}") from None


def iter_data_share(
    data_dir: str,
    *,
    num_samples: int,
    batch_size: int,
    image_size: int,
    class_cond: bool,
    rank: int,
    world: int,
    device: torch.device,
) -> Iterator[Tuple[np.ndarray, torch.Tensor, dict]]:
    """This process's share of the first ``num_samples`` images: global indices j with
    ``j % world == rank``, in order, as (indices, x0 (n, 3, H, W) in [-1, 1], model_kwargs).

    Validates at call time (not at the first batch): raises ``DataError`` (one line) for a
    missing or bad ``data_dir`` and for ``num_samples`` larger than the data.
    """
    from .image_datasets import DataError, load_data

    if not data_dir:
        raise DataError("--data_dir is required: an image folder or an .npz file of x_0")
    stream = load_data(
        data_dir=data_dir,
        batch_size=1,
        image_size=image_size,
        class_cond=class_cond,
        deterministic=True,
        random_flip=False,
        num_workers=0,
        shard=rank,
        num_shards=world,
    )
    total = count_images(data_dir)
    if num_samples > total:
        raise DataError(f"--num_samples {num_samples} exceeds the {total} images in {data_dir}")
    mine = np.arange(rank, num_samples, world)

    def batches() -> Iterator[Tuple[np.ndarray, torch.Tensor, dict]]:
        for start in range(0, len(mine), batch_size):
            idx = mine[start : start + batch_size]
            items = [next(stream) for _ in idx]
            x0 = torch.cat([x for x, _ in items]).to(device)
            kwargs = {}
            if class_cond:
                kwargs["y"] = torch.cat([c["y"] for _, c in items]).to(device)
            yield idx, x0, kwargs

    return batches()


def gather_rows(
    indices: np.ndarray,
    rows: Dict[str, np.ndarray],
    all_gather: Callable[[Any], List[Any]],
) -> Dict[str, np.ndarray]:
    """Per-sample rows of every process, sorted by global sample index."""
    parts = all_gather((np.asarray(indices), rows))
    idx = np.concatenate([p[0] for p in parts])
    order = np.argsort(idx, kind="stable")
    return {k: np.concatenate([p[1][k] for p in parts], axis=0)[order] for k in rows}


def parse_float_pair(text: str, flag: str) -> Tuple[float, float]:
    """``"0.95,1.10"`` -> (0.95, 1.1); ValueError naming ``flag`` otherwise."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"invalid --{flag} {text!r}: expected LO,HI, e.g. 0.95,1.10") from None
    if not 0 < lo < hi:
        raise ValueError(f"invalid --{flag} {text!r}: need 0 < LO < HI")
    return lo, hi


def parse_steps(text: str, flag: str) -> List[int]:
    """``"0,1"`` -> [0, 1] (empty string: none)."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(
            f"invalid --{flag} {text!r}: expected comma-separated step indices, e.g. 0"
        ) from None


def factory_from_args(args: argparse.Namespace) -> DiffusionFactory:
    """``(b, k) -> build_diffusion(args with --eps_scaler b --eps_scaler_k k)``."""
    from .sample_util import build_diffusion

    def make(b: float, k: float) -> GaussianDiffusion:
        flags = {**vars(args), "eps_scaler": b, "eps_scaler_k": k}
        return build_diffusion(argparse.Namespace(**flags))

    return make


def script_data_share(
    args: argparse.Namespace, batch_size: int
) -> Iterator[Tuple[np.ndarray, torch.Tensor, dict]]:
    """``iter_data_share`` for a script's flags (``--data_dir``, ``--num_samples``,
    ``--image_size``, ``--class_cond``) on this process's rank, world and device."""
    from . import dist_util

    return iter_data_share(
        args.data_dir,
        num_samples=args.num_samples,
        batch_size=batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        rank=dist_util.get_rank(),
        world=dist_util.get_world_size(),
        device=dist_util.dev(),
    )


def start_script(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """``sample_util.start_sampling_script``, for eps-prediction models only."""
    from .sample_util import start_sampling_script

    args = start_sampling_script(parser)
    if args.predict_xstart:
        raise ValueError("epsilon norms need an eps-prediction model: use --predict_xstart False")
    return args


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar on rank 0 when ``enabled``, else None."""
    from . import dist_util

    if not enabled or not dist_util.is_main():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)
