"""Epsilon Scaling calibration: the lambda_i = k * i + b that brings the sampling eps-norm
curve onto the training curve (Ning et al., ICLR 2024, Sec. "Epsilon L2-norm").

The objective (``OBJECTIVE``) is closed loop: every candidate lambda samples the batch again,
from the same x_T and noise, and its sampling curve ``S_i = mean_n ||eps_theta(x̂_i) /
lambda_i||`` is measured along that trajectory (``exposure_bias.sampling_pass``) and compared
with the training curve ``T_i`` (``exposure_bias.train_eps_norms``) through the relative gap
``g_i = S_i / T_i - 1``. Two fits: uniform b (k = 0), the root of ``mean_i g_i(b)``
(``find_root_1d``: secant, safeguarded by bisection), and linear (k, b), the root of the
mean and the least-squares slope of g_i in i (Broyden's method, ``_fit_linear``).

``calibrate`` returns a ``CalibrationResult``, which round-trips through JSON
(``to_json``/``from_json``). Step indices, rows and timesteps follow the conventions of
``exposure_bias``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .exposure_bias import (
    ModelFn,
    check_eps_model,
    original_timesteps,
    relative_gap,
    sample_seeds,
    sampling_pass,
    train_eps_norms,
)
from .gaussian_diffusion import GaussianDiffusion

# (local per-sample rows) -> the rows of every process, in global sample order
GatherFn = Callable[[np.ndarray], np.ndarray]

OBJECTIVE = (
    "closed-loop epsilon-norm matching: g_i(k, b) = S_i / T_i - 1 with "
    "S_i = mean_n ||eps_theta(x_hat_i, t_i) / lambda_i|| along the trajectory sampled WITH "
    "lambda_i = k*i + b (same x_T and noise for every candidate) and T_i = "
    "mean_n ||eps_theta(x_t_i, t_i)||, x_t_i ~ q(x_t_i | x_0); uniform: b with "
    "mean_i g_i = 0; linear: (k, b) with mean_i g_i = 0 and zero least-squares slope of "
    "g_i against i/(K-1); i over the included steps"
)
FITS = ("uniform", "linear")


# ----------------------------------------------------------------------------- the objective


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


# ----------------------------------------------------------------------------- the solvers


def _tightest_bracket(pts: List[Tuple[float, float]]) -> Optional[Tuple[float, float]]:
    """The narrowest interval between neighbouring evaluated points where f changes sign."""
    ordered = sorted(pts)
    bracket = None
    for (a, fa), (b, fb) in zip(ordered, ordered[1:]):
        if fa * fb < 0 and (bracket is None or b - a < bracket[1] - bracket[0]):
            bracket = (a, b)
    return bracket


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
        bracket = _tightest_bracket(pts)
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


# ----------------------------------------------------------------------------- results


def _num(v: Any) -> float:
    """A JSON number back to float (``to_json`` writes non-finite numbers as None)."""
    return math.nan if v is None else float(v)


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
        """The pass as JSON-ready values (``sample_norm`` by step index i)."""
        keys = ("k", "b", "gap", "gap_se", "rms_gap", "slope", "phase")
        return {
            **{key: getattr(self, key) for key in keys},
            "sample_norm": [float(v) for v in self.sample_norm],
        }

    @classmethod
    def from_summary(cls, d: Dict[str, Any], train_norm: np.ndarray) -> Evaluation:
        """The pass back from ``summary()`` (``sample_norm`` NaN where a file lacks it)."""
        sample_norm = np.array([_num(v) for v in d.get("sample_norm") or [None] * len(train_norm)])
        stats = {key: _num(d[key]) for key in ("gap", "rms_gap", "slope", "gap_se")}
        g = relative_gap(sample_norm, train_norm)
        return cls(float(d["k"]), float(d["b"]), d["phase"], sample_norm, g, **stats)


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
        if which not in FITS:
            raise ValueError(f"which must be one of {FITS}, got {which!r}")
        if which == "uniform":
            return f"--eps_scaler {self.uniform.b:.6g} --eps_scaler_k 0"
        return f"--eps_scaler {self.linear.b:.6g} --eps_scaler_k {self.linear.k:.6g}"

    def to_json(self) -> Dict[str, Any]:
        """Everything as plain JSON types (non-finite numbers become None)."""
        u, lin = self.uniform.summary(), self.linear.summary()
        return _json_safe(
            {
                "uniform": {
                    **{k: u[k] for k in ("b", "gap", "gap_se", "rms_gap")},
                    **dict(gain=self.uniform_gain, b_se=self.uniform_b_se),
                    **dict(status=self.uniform_status, flags=self.flags("uniform")),
                },
                "linear": {
                    **{k: lin[k] for k in ("k", "b", "gap", "rms_gap", "slope")},
                    **dict(status=self.linear_status, flags=self.flags("linear")),
                },
                "baseline": {k: getattr(self.baseline, k) for k in ("gap", "gap_se", "rms_gap")},
                "steps": self.steps,
                "timesteps": [int(t) for t in self.timesteps],
                "excluded_steps": [int(i) for i in np.flatnonzero(~self.included)],
                "num_samples": self.num_samples,
                "sampler": self.sampler,
                "b_range": list(self.b_range),
                "objective": OBJECTIVE,
                "evaluations": [e.summary() for e in self.evaluations],
                "train_norm": [float(v) for v in self.train_norm],
            }
        )

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> CalibrationResult:
        """The result back from ``to_json()`` (e.g. a saved ``calibration.json``).

        The baseline, uniform and linear fits are the evaluations of ``d["evaluations"]``
        at their (k, b), as in the result that was saved. Files without the per-pass
        ``sample_norm`` curves load with NaN curves. Raises ``ValueError`` when a fit has
        no evaluation.
        """
        steps = int(d["steps"])
        train_norm = np.array([_num(v) for v in d["train_norm"]])
        included = np.ones(steps, dtype=bool)
        included[[int(i) for i in d["excluded_steps"]]] = False
        evaluations = [Evaluation.from_summary(e, train_norm) for e in d["evaluations"]]

        def find(which: str, k: float, b: float) -> Evaluation:
            for e in evaluations:
                if (e.k, e.b) == (k, b):
                    return e
            raise ValueError(f"calibration JSON: no evaluation at the {which} fit k = {k}, b = {b}")

        uniform, linear = d["uniform"], d["linear"]
        return cls(
            steps=steps,
            timesteps=np.asarray(d["timesteps"], dtype=np.int64),
            included=included,
            num_samples=int(d["num_samples"]),
            sampler=d["sampler"],
            train_norm=train_norm,
            baseline=find("baseline", 0.0, 1.0),
            uniform=find("uniform", 0.0, float(uniform["b"])),
            linear=find("linear", float(linear["k"]), float(linear["b"])),
            evaluations=evaluations,
            uniform_status=uniform["status"],
            uniform_gain=_num(uniform["gain"]),
            uniform_b_se=_num(uniform["b_se"]),
            linear_status=linear["status"],
            b_range=(float(d["b_range"][0]), float(d["b_range"][1])),
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


# ----------------------------------------------------------------------------- calibration


@dataclass
class _ClosedLoop:
    """The objective on one batch (see ``calibrate``): ``evaluate(k, b, phase)`` samples the
    batch with lambda_i = k i + b, from the same x_T and noise for every candidate, and
    records the pass in ``evaluations`` (in the order evaluated; a repeated (k, b) is reused).
    """

    rows: Callable[[Callable[..., np.ndarray]], np.ndarray]  # per-sample rows of all processes
    model: ModelFn
    diffusion: GaussianDiffusion
    options: Dict[str, Any]  # sampler, clip_denoised
    include: np.ndarray
    train_norm: np.ndarray
    train_rows: Optional[np.ndarray]
    callback: Optional[Callable[[Evaluation], None]]
    evaluations: List[Evaluation] = field(default_factory=list)

    def evaluate(self, k: float, b: float, phase: str) -> Evaluation:
        k, b = float(k), float(b)
        for ev in self.evaluations:
            if (ev.k, ev.b) == (k, b):
                return ev
        diff = self.diffusion.with_eps_scaler(b, k)
        lam = np.asarray(diff.eps_scale, dtype=np.float64)

        def eps_norms(x: torch.Tensor, s: Sequence[int], kw: dict) -> np.ndarray:
            return sampling_pass(diff, self.model, x, s, model_kwargs=kw, **self.options).eps_norm

        rows = self.rows(eps_norms) / lam  # ||eps / lambda_i|| per sample
        sample_norm = rows.mean(axis=0)
        g = relative_gap(sample_norm, self.train_norm)
        mean, rms, slope = gap_stats(g, self.include)
        if not math.isfinite(mean):
            raise ValueError(
                f"sampling with lambda_i = {k:g} * i + {b:g} gave non-finite eps norms"
            )
        se = gap_standard_error(rows, self.train_norm, self.include, self.train_rows)
        ev = Evaluation(k, b, phase, sample_norm, g, mean, rms, slope, se)
        self.evaluations.append(ev)
        if self.callback is not None:
            self.callback(ev)
        return ev


def _included_steps(steps: int, exclude_steps: Sequence[int]) -> np.ndarray:
    include = np.ones(steps, dtype=bool)
    for i in exclude_steps:
        if not 0 <= int(i) < steps:
            raise ValueError(f"excluded step {i} is outside 0..{steps - 1}")
        include[int(i)] = False
    if not include.any():
        raise ValueError(f"every one of the {steps} steps is excluded: nothing to calibrate on")
    return include


def _check_train_norm(train_norm: np.ndarray, steps: int) -> np.ndarray:
    train_norm = np.asarray(train_norm, dtype=np.float64)
    if train_norm.shape != (steps,):
        raise ValueError(f"train_norm must have shape ({steps},), got {train_norm.shape}")
    bad = np.flatnonzero(~(np.isfinite(train_norm) & (train_norm > 0)))
    if bad.size:
        raise ValueError(
            f"the training eps norm is zero or not finite at steps {bad.tolist()} "
            "(an untrained model outputs 0): nothing to match"
        )
    return train_norm


def calibrate(
    model: ModelFn,
    diffusion: GaussianDiffusion,
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
    sampled WITH that lambda (``diffusion.with_eps_scaler(b, k)``), from the same x_T and
    noise for every candidate, and ``g_i = S_i / T_i - 1`` compares
    ``S_i = mean ||eps_theta(x̂_i) / lambda_i||`` with the training curve ``T_i``, over the
    steps not in ``exclude_steps`` (default: the last step i = 0, an outlier at every lambda).
    Uniform b: the root of ``mean_i g_i(b)`` in ``b_range`` to ``tol`` (``_fit_uniform``);
    linear (k, b): the root of (mean, slope) of g_i by Broyden's method (``_fit_linear``).
    Each pass costs K network calls per sample; a typical run is one baseline pass, 3-5
    uniform and 2-4 linear passes, plus the training curve (K calls per sample).

    :param diffusion: the sampling diffusion (its own lambda is ignored).
    :param x0: (N, C, H, W) data batch (this process's share when ``gather`` is given); all
        processes together need at least 2 samples (for the standard error of b).
    :param seeds: per-sample seeds (default ``sample_seeds(0, range(N))``).
    :param batch_size: split the network calls into chunks of this many samples.
    :param train_norm: a precomputed reference curve T (K,); computed from ``x0`` if None.
    :param gather: combines per-sample rows (N_local, ...) of all processes in global order
        (every process then takes the same decisions); None for a single process.
    :param callback: called with every new ``Evaluation`` (progress output).
    """
    base = diffusion.with_eps_scaler(1.0, 0.0)
    check_eps_model(base)
    K = base.num_timesteps
    lo, hi = float(b_range[0]), float(b_range[1])
    if not 0 < lo < hi:
        raise ValueError(f"b_range must satisfy 0 < lo < hi, got {lo}, {hi}")
    include = _included_steps(K, exclude_steps)
    seeds = sample_seeds(0, range(x0.shape[0])) if seeds is None else seeds
    if len(seeds) != x0.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {x0.shape[0]} samples")
    gather = gather or (lambda rows: rows)
    num_samples = gather(np.zeros((x0.shape[0], 0))).shape[0]  # over every process
    if num_samples < 2:
        raise ValueError(
            f"calibrate needs at least 2 samples for the standard error of b, got {num_samples}"
        )
    size = x0.shape[0] if not batch_size else max(1, int(batch_size))
    chunks = [slice(s, min(s + size, x0.shape[0])) for s in range(0, x0.shape[0], size)]

    def rows(fn: Callable[..., np.ndarray]) -> np.ndarray:
        """``fn(x0, seeds, model_kwargs)`` rows (n, K) over the chunks, gathered (N, K)."""
        kw = model_kwargs or {}
        parts = [fn(x0[sl], seeds[sl], {k: v[sl] for k, v in kw.items()}) for sl in chunks]
        return gather(np.concatenate(parts, axis=0) if parts else np.zeros((0, K)))

    train_rows = None
    if train_norm is None:
        train_rows = rows(lambda x, s, kw: train_eps_norms(base, model, x, s, model_kwargs=kw))
        train_norm = train_rows.mean(axis=0)
    train_norm = _check_train_norm(train_norm, K)
    options = dict(sampler=sampler, clip_denoised=clip_denoised)
    loop = _ClosedLoop(rows, model, base, options, include, train_norm, train_rows, callback)
    baseline, uniform, status, near = _fit_uniform(loop, lo, hi, tol, max_evals)
    gain = (near.gap - uniform.gap) / (near.b - uniform.b) if near is not None else math.nan
    if int(include.sum()) < 2 or K < 2:
        linear, lin_status = uniform, "not identifiable (fewer than 2 included steps): k = 0"
    else:
        linear, lin_status = _fit_linear(
            loop.evaluate, uniform, near, include, K, lo, hi, tol, max_evals_linear
        )
    return CalibrationResult(
        steps=K,
        timesteps=original_timesteps(base),
        included=include,
        num_samples=num_samples,
        sampler=sampler,
        train_norm=train_norm,
        baseline=baseline,
        uniform=uniform,
        linear=linear,
        evaluations=loop.evaluations,
        uniform_status=status,
        uniform_gain=float(gain),
        uniform_b_se=float(uniform.gap_se / abs(gain)) if gain else math.nan,
        linear_status=lin_status,
        b_range=(lo, hi),
    )


def _fit_uniform(
    loop: _ClosedLoop, lo: float, hi: float, tol: float, max_evals: int
) -> Tuple[Evaluation, Evaluation, str, Optional[Evaluation]]:
    """The uniform b: the root of ``mean_i g_i(b)`` by the secant method started from
    lambda = 1 and the open-loop guess ``b = 1 + mean_i g_i(1)``, safeguarded by bisection,
    clamped to [lo, hi], to ``tol`` in b (``find_root_1d``).

    :return: (the lambda = 1 pass, the pass at b, status, the other uniform pass nearest in b).
    """
    baseline = loop.evaluate(0.0, 1.0, "baseline")
    b_star, status = find_root_1d(
        lambda b: loop.evaluate(0.0, b, "uniform").gap,
        1.0,
        baseline.gap,
        1.0 + baseline.gap,
        lo,
        hi,
        tol,
        max_evals,
    )
    uniform = loop.evaluate(0.0, b_star, "uniform")
    return baseline, uniform, status, _nearest_uniform(loop.evaluations, uniform)


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
    """The linear (k, b): the root of F = (mean of g_i, least-squares slope of g_i against
    i/(K-1)) = P g in (b, d = k (K-1)) (the lambdas at both ends), by Broyden's method from
    (b_uniform, 0). The initial Jacobian is closed loop: the b column from the last two
    uniform passes, the d column from one probe pass at d = +-0.02; each further pass updates
    it. Stops at a step below ``tol`` or after ``max_evals`` passes, returning the pass with
    the smallest |F|."""
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
