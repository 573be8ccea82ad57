"""The effective noise level of a diffusion state: how much signal and how much white noise
an image x̂ actually carries, next to the nominal level of the step it is fed to.

The forward process makes ``x_t = c x_0 + s eps`` with ``c = sqrt(abar_t)`` and
``s = sqrt(1 - abar_t)``. For a state x̂ of unknown (c, s), two second moments per sample,
averaged over the pixels of every channel,

* ``m(x) = mean(x^2)`` (all frequencies) and
* ``h(x) = mean((L x)^2)`` with L the 3x3 Laplacian (valid convolution per channel; high
  frequencies, where white noise has ``W = sum(L^2) = 20`` times its variance),

obey, for eps independent of x_0, ``E m = c^2 m_0 + s^2`` and ``E h = c^2 h_0 + s^2 W``
with ``m_0 = E m(x_0)``, ``h_0 = E h(x_0)`` of the data. Two linear equations give
``(c^2, s^2)`` (``decompose``): the signal scale and the noise variance of x̂, with no
assumption that ``c^2 + s^2 = 1``. The *effective* noise level is ``sigma_eff = s / c``
(the ``sqrt((1 - abar) / abar)`` of the forward step with the same signal-to-noise ratio)
and the effective timestep is the (fractional) timestep of the schedule with that
log-SNR (``effective_timestep``). This is the variance matching of TS-DPM (Li et al. 2024)
made two-dimensional, so that a state that holds the right total variance but the wrong
split between content and noise is told apart.

For a forward sample ``x_t ~ q(x_t | x_0)`` the estimates are unbiased up to the ratio
of means: ``sigma_eff / sigma_t -> 1`` (``tests/test_noise_level.py`` checks this and
known excess noise on Gaussian data, where every moment is in closed form). The
assumption that matters for a *sampler's* state is that its content has the data's ratio
``h_0 / m_0``: generated content with extra high frequencies reads as extra noise. That
is what FID penalises too, but it is a confound to keep in mind at the last steps, where
the noise is small.

Intervals come from a bootstrap over samples (``curve_intervals``); states of several runs
from the same seeds (e.g. several eps scalers) are resampled with the same draw, so
differences between them are paired.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .seeding import resample_counts

LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
W = float(np.sum(np.square(LAPLACIAN)))  # white noise's gain through L: 20
STATS = ("m", "h")  # the two per-sample moments, in this order on the last axis


def state_stats(x: torch.Tensor) -> torch.Tensor:
    """Per-sample ``[m, h]`` of a batch (N, C, H, W) as float64 (N, 2): the mean square of
    x and of its Laplacian (valid 3x3 convolution of every channel; H, W >= 3)."""
    if x.ndim != 4 or x.shape[-1] < 3 or x.shape[-2] < 3:
        raise ValueError(f"state_stats needs (N, C, H, W) images with H, W >= 3, got {x.shape}")
    x = x.detach().double()
    n, c, hh, ww = x.shape
    kernel = torch.tensor(LAPLACIAN, dtype=x.dtype, device=x.device).view(1, 1, 3, 3)
    lap = F.conv2d(x.reshape(n * c, 1, hh, ww), kernel).reshape(n, -1)
    m = x.reshape(n, -1).pow(2).mean(dim=1)
    h = lap.pow(2).mean(dim=1)
    return torch.stack([m, h], dim=1).cpu()


@dataclass(frozen=True)
class DataMoments:
    """``m_0 = E mean(x_0^2)`` and ``h_0 = E mean((L x_0)^2)`` of the data (``of``)."""

    m0: float
    h0: float

    @classmethod
    def of(cls, rows: np.ndarray) -> DataMoments:
        """From per-sample ``state_stats`` rows (N, 2) of data images."""
        rows = np.asarray(rows, dtype=np.float64)
        m0, h0 = rows.mean(axis=0)
        return cls(float(m0), float(h0))

    def check(self) -> None:
        if not self.m0 * W - self.h0 > 1e-6 * W:
            raise ValueError(
                f"the data's moments (m0 {self.m0:.4g}, h0 {self.h0:.4g}) cannot separate "
                "signal from noise: its high frequencies look like white noise"
            )


def decompose(m: np.ndarray, h: np.ndarray, data: DataMoments) -> Dict[str, np.ndarray]:
    """``c^2`` (signal power) and ``s^2`` (noise variance) of states with mean moments
    ``m``, ``h`` (any shape), from ``m = c^2 m0 + s^2`` and ``h = c^2 h0 + s^2 W``."""
    data.check()
    m, h = np.asarray(m, dtype=np.float64), np.asarray(h, dtype=np.float64)
    det = data.m0 * W - data.h0
    c2 = (m * W - h) / det
    s2 = (data.m0 * h - data.h0 * m) / det
    return {"c2": c2, "s2": s2}


def nominal_sigma(alphas_cumprod: np.ndarray) -> np.ndarray:
    """The forward process's noise level ``sqrt((1 - abar) / abar)``."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.sqrt((1.0 - abar) / abar)


def effective_timestep(sigma: np.ndarray, schedule_abar: np.ndarray) -> np.ndarray:
    """The fractional 0-based timestep of the schedule ``schedule_abar`` (T,) whose
    ``sqrt((1 - abar) / abar)`` equals ``sigma`` (interpolated in log sigma; clamped to
    [0, T - 1]; NaN where sigma is not a positive finite number)."""
    log_sched = np.log(nominal_sigma(schedule_abar))  # increasing in t
    sigma = np.asarray(sigma, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        log_s = np.log(np.where(sigma > 0, sigma, np.nan))
    t = np.interp(log_s, log_sched, np.arange(len(log_sched), dtype=np.float64))
    return np.where(np.isfinite(log_s), t, np.nan)


def level_curve(
    rows: np.ndarray, data: DataMoments, alphas_cumprod: np.ndarray, schedule_abar: np.ndarray
) -> Dict[str, np.ndarray]:
    """Mean effective noise level of states ``rows`` (N, K, 2) fed to steps with
    ``alphas_cumprod`` (K,) against their nominal one.

    :return: by step (K,): ``signal_ratio`` c / sqrt(abar), ``noise_ratio``
        s / sqrt(1 - abar), ``sigma_ratio`` sigma_eff / sigma_nominal, ``t_eff`` and
        ``t_nominal`` (fractional 0-based timesteps of ``schedule_abar``). NaN where c^2 or
        s^2 is not positive.
    """
    mean = np.asarray(rows, dtype=np.float64).mean(axis=0)  # (K, 2)
    parts = decompose(mean[:, 0], mean[:, 1], data)
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.sqrt(np.where(parts["c2"] > 0, parts["c2"], np.nan))
        s = np.sqrt(np.where(parts["s2"] > 0, parts["s2"], np.nan))
        sigma = s / c
    return {
        "signal_ratio": c / np.sqrt(abar),
        "noise_ratio": s / np.sqrt(1.0 - abar),
        "sigma_ratio": sigma / nominal_sigma(abar),
        "t_eff": effective_timestep(sigma, schedule_abar),
        "t_nominal": effective_timestep(nominal_sigma(abar), schedule_abar),
    }


def curve_intervals(
    runs: Dict[str, np.ndarray],
    data_rows: np.ndarray,
    alphas_cumprod: np.ndarray,
    schedule_abar: np.ndarray,
    *,
    baseline: Optional[str] = None,
    num_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Dict[str, Dict[str, Dict[str, np.ndarray]]]:
    """``level_curve`` of every run with percentile-bootstrap intervals.

    :param runs: name -> state rows (N, K, 2); row n of every run from the same seed (one
        resampling draw for all runs: the differences are paired).
    :param data_rows: ``state_stats`` rows (M, 2) of data images (resampled independently).
    :param baseline: a run name; adds ``diff_<name>`` = the run's ``sigma_ratio`` minus the
        baseline's, with its paired interval.
    :return: run -> quantity -> {``value`` (K,), ``low`` (K,), ``high`` (K,)}.
    """
    names = list(runs)
    n = {np.asarray(r).shape[0] for r in runs.values()}
    if len(n) != 1:
        raise ValueError(f"every run needs the same samples (rows), got {sorted(n)}")
    (num,) = n
    if baseline is not None and baseline not in runs:
        raise ValueError(f"baseline {baseline!r} is not one of the runs {names}")
    data_rows = np.asarray(data_rows, dtype=np.float64)
    point = {
        k: level_curve(runs[k], DataMoments.of(data_rows), alphas_cumprod, schedule_abar)
        for k in names
    }
    counts = resample_counts(num, num_boot, seed)
    data_counts = resample_counts(len(data_rows), num_boot, seed + 1)
    boot: Dict[str, Dict[str, list]] = {k: {} for k in names}
    for c, dc in zip(counts, data_counts):
        data = DataMoments(*(dc @ data_rows / dc.sum()))
        curves = {}
        for k in names:
            resampled = np.tensordot(c, np.asarray(runs[k], dtype=np.float64), axes=1) / num
            curves[k] = level_curve(resampled[None], data, alphas_cumprod, schedule_abar)
            for q, v in curves[k].items():
                boot[k].setdefault(q, []).append(v)
        if baseline is not None:
            for k in names:
                diff = curves[k]["sigma_ratio"] - curves[baseline]["sigma_ratio"]
                boot[k].setdefault(f"diff_{baseline}", []).append(diff)
    lo_q, hi_q = (1 - level) / 2, (1 + level) / 2
    out: Dict[str, Dict[str, Dict[str, np.ndarray]]] = {}
    for k in names:
        values = dict(point[k])
        if baseline is not None:
            values[f"diff_{baseline}"] = point[k]["sigma_ratio"] - point[baseline]["sigma_ratio"]
        out[k] = {}
        for q, v in values.items():
            b = np.asarray(boot[k][q])
            with np.errstate(invalid="ignore"):
                low, high = (
                    np.nanquantile(b, [lo_q, hi_q], axis=0)
                    if np.isfinite(b).any()
                    else (
                        np.full_like(v, np.nan),
                        np.full_like(v, np.nan),
                    )
                )
            out[k][q] = {"value": v, "low": low, "high": high}
    return out


def fractional_root(grid: Sequence[float], values: Sequence[float]) -> float:
    """The x where the piecewise-linear interpolation of ``values`` on the increasing
    ``grid`` crosses 0 (the first crossing; NaN if none)."""
    x, y = np.asarray(grid, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if np.any(np.diff(x) <= 0):
        raise ValueError(f"the grid must increase, got {x.tolist()}")
    for i in range(len(x) - 1):
        a, b = y[i], y[i + 1]
        if a == 0:
            return float(x[i])
        if np.isfinite(a) and np.isfinite(b) and a * b < 0:
            return float(x[i] + (x[i + 1] - x[i]) * a / (a - b))
    return float(x[-1]) if len(y) and y[-1] == 0 else float("nan")
