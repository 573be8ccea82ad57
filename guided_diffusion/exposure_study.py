"""The exposure-bias study (``scripts/exposure_study.py``): when does Epsilon Scaling help?

For one *setting* (a checkpoint and a step count) the study samples the same seeds at every
eps scaler lambda of a grid, from pure noise, and records from each pass, per sample:

* the raw eps norm ``||eps_theta(x̂_i, t_i)||`` at every step (for norm matching),
* the moments ``[m, h]`` of every state x̂_i fed to a step and of the output x̂_0
  (``noise_level.state_stats``: its effective noise level),
* the output image (for FID with the project's feature net).

Everything derived from a setting is a function of these per-sample rows, so one bootstrap
over the seeds (the same draw for every lambda: paired) gives intervals for all of it
(``analyse``): FID(lambda) and FID(lambda) - FID(1); the FID-optimal lambda (parabolic
vertex around the grid's minimum); the lambda at which each calibration objective is met
(``OBJECTIVES``, the root in lambda of a piecewise-linear interpolation on the grid); the
eps-norm gap and the effective-noise curves at every lambda.

Randomness is per sample (``seeding``): sample j's label, x_T and step noise depend only on
(seed, j), so results depend on neither batch size nor machine, and the passes of a setting
are resumable batch by batch (``run_pass``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from . import noise_level as nl
from .exposure_bias import STREAM_SAMPLE, PerSampleNoise, check_eps_model, train_eps_norms
from .io_util import save_npz_atomic
from .sample_util import to_uint8_nhwc
from .seeding import resample_counts, sample_seeds, stream_seed

STREAM_LABEL = 3  # the class label of sample j (the other streams: exposure_bias)
ROW_KEYS = ("eps_norm", "states", "final", "images")

# name -> what it matches; each is a function of a pass's per-sample rows (``objective``)
OBJECTIVES = {
    "norm": "sampling eps-norm ||eps/lambda|| on the training curve, mean over steps i >= 1 "
    "(the current calibrate_eps_scaler.py objective, here on the grid)",
    "noise": "effective noise level of the sampler's inputs on the nominal one: mean over "
    "steps 1 <= i <= K-2 with nominal sigma in [0.1, 10] of log(sigma_eff / sigma_nominal) = 0 "
    "(least squares if never 0)",
    "step1": "effective noise level of the first sampled state (the input of step K-2) on "
    "the nominal one",
    "highfreq": "Laplacian energy of the output x̂_0 on the data's (h(x̂_0) / h_0 = 1)",
}


def _labels(seeds: Sequence[int], num_classes: int) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(stream_seed(s, STREAM_LABEL)) for s in seeds]
    return torch.cat([torch.randint(0, num_classes, (1,), generator=g) for g in gens])


def sample_rows(
    model: Callable[..., torch.Tensor],
    diffusion: Any,
    seeds: Sequence[int],
    *,
    shape: Sequence[int],
    device: torch.device,
    num_classes: Optional[int] = None,
    sampler: str = "ddpm",
    clip_denoised: bool = True,
) -> Dict[str, np.ndarray]:
    """One batch sampled from pure noise with the diffusion's own lambda schedule.

    :return: ``eps_norm`` (n, K) raw norms by step index i, ``states`` (n, K, 2) the
        ``state_stats`` of the input of step i, ``final`` (n, 2) those of x̂_0 (unclipped
        float), ``images`` uint8 (n, H, W, 3).
    """
    check_eps_model(diffusion)
    n, K = len(seeds), diffusion.num_timesteps
    noise = PerSampleNoise(seeds, STREAM_SAMPLE, shape, device)
    kwargs = {} if num_classes is None else {"y": _labels(seeds, num_classes).to(device)}
    norms: List[Any] = [None] * K
    states: List[Any] = [None] * K
    last = None
    for out in diffusion.sample_loop_progressive(
        model,
        (n, *shape),
        noise=noise(),
        model_kwargs=kwargs,
        device=device,
        noise_fn=noise,
        sampler=sampler,
        clip_denoised=clip_denoised,
    ):
        i = int(out["t"][0])
        norms[i] = out["eps"].float().flatten(1).norm(dim=1).double().cpu()
        states[i] = nl.state_stats(out["x_t"])
        last = out["sample"]
    return {
        "eps_norm": torch.stack(norms, dim=1).numpy(),
        "states": torch.stack(states, dim=1).numpy(),
        "final": nl.state_stats(last).numpy(),
        "images": to_uint8_nhwc(last.clamp(-1, 1)).cpu().numpy(),
    }


def run_pass(
    folder: Path,
    model: Callable[..., torch.Tensor],
    diffusion: Any,
    *,
    num_samples: int,
    batch_size: int,
    seed: int,
    progress: Optional[Callable[[int], None]] = None,
    **kwargs: Any,
) -> Dict[str, np.ndarray]:
    """``sample_rows`` of samples 0..num_samples-1, batch by batch; each batch is saved in
    ``folder`` when done and reused by a rerun (a crash loses at most the batch in flight).
    ``progress(n)`` is called with the samples of every batch."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for start in range(0, num_samples, batch_size):
        stop = min(start + batch_size, num_samples)
        path = folder / f"rows_{start:06d}_{stop:06d}.npz"
        if path.exists():
            with np.load(path) as z:
                part = {k: z[k] for k in ROW_KEYS}
        else:
            part = sample_rows(model, diffusion, sample_seeds(seed, range(start, stop)), **kwargs)
            save_npz_atomic(path, **part)
        parts.append(part)
        if progress is not None:
            progress(stop - start)
    return {k: np.concatenate([p[k] for p in parts]) for k in ROW_KEYS}


def train_curve(
    folder: Path,
    model: Callable[..., torch.Tensor],
    diffusion: Any,
    x0: torch.Tensor,
    model_kwargs: dict,
    seed: int,
) -> np.ndarray:
    """Per-sample training eps norms (N, K) on data x0 (``train_eps_norms``), cached."""
    path = folder / "train_eps_norm.npz"
    if path.exists():
        with np.load(path) as z:
            return z["rows"]
    rows = train_eps_norms(
        diffusion.with_eps_scaler(1.0),
        model,
        x0,
        sample_seeds(seed, range(len(x0))),
        model_kwargs=model_kwargs,
    )
    save_npz_atomic(path, rows=rows)
    return rows


# ----------------------------------------------------------------------------- analysis


SIGMA_RANGE = (0.1, 10.0)


def noise_steps(alphas_cumprod: np.ndarray) -> np.ndarray:
    """The step indices whose input the ``noise`` objective averages over: 1 <= i <= K-2
    (not x_T, nominal by construction) with a nominal sigma in ``SIGMA_RANGE``, where both
    the signal and the noise are large enough for two moments to resolve (the same steps at
    every lambda; an unresolvable one among them makes the objective NaN)."""
    sig = nl.nominal_sigma(alphas_cumprod)
    i = np.arange(len(sig))
    keep = (i >= 1) & (i <= len(sig) - 2) & (sig >= SIGMA_RANGE[0]) & (sig <= SIGMA_RANGE[1])
    return np.flatnonzero(keep)


def objective(
    name: str,
    lam: float,
    eps_mean: np.ndarray,
    states_mean: np.ndarray,
    final_mean: np.ndarray,
    train_norm: np.ndarray,
    data: nl.DataMoments,
    alphas_cumprod: np.ndarray,
    schedule_abar: np.ndarray,
) -> float:
    """The value of objective ``name`` for one pass at uniform lambda ``lam`` from its
    mean rows (``eps_mean`` (K,), ``states_mean`` (K, 2), ``final_mean`` (2,)); a
    calibration picks the lambda where it is 0."""
    K = len(eps_mean)
    if name == "norm":
        gap = eps_mean / lam / train_norm - 1
        return float(np.mean(gap[1:])) if K > 1 else float(gap[0])
    if name in ("noise", "step1"):
        ratio = nl.level_curve(states_mean[None], data, alphas_cumprod, schedule_abar)
        log_r = np.log(ratio["sigma_ratio"])  # by step index i: the input of step i
        if name == "step1":
            return float(log_r[K - 2]) if K > 2 else math.nan
        inner = log_r[noise_steps(alphas_cumprod)]
        return float(inner.mean()) if inner.size else math.nan
    if name == "highfreq":
        return float(final_mean[1] / data.h0 - 1)
    raise ValueError(f"unknown objective {name!r}: choose among {', '.join(OBJECTIVES)}")


def best_lambda(grid: np.ndarray, fid: np.ndarray) -> float:
    """The FID-optimal lambda: the vertex of the parabola through the grid's minimum and its
    two neighbours (clamped between them); the grid's end point when the minimum is there."""
    j = int(np.nanargmin(fid))
    if j == 0 or j == len(grid) - 1:
        return float(grid[j])
    x, y = grid[j - 1 : j + 2], fid[j - 1 : j + 2]
    a, b, _ = np.polyfit(x, y, 2)
    if a <= 0:
        return float(grid[j])
    return float(np.clip(-b / (2 * a), x[0], x[2]))


def closest_match(grid: Sequence[float], values: Sequence[float]) -> float:
    """The lambda where an objective is met as closely as the grid allows: its root where
    it changes sign, else the parabolic vertex of |value| around its smallest |value| (the
    least-squares match when no lambda meets it exactly); NaN values are skipped."""
    g, v = np.asarray(grid, dtype=np.float64), np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    if not ok.any():
        return math.nan
    root = nl.fractional_root(g[ok], v[ok]) if ok.sum() > 1 else math.nan
    return float(root) if np.isfinite(root) else best_lambda(g[ok], np.abs(v[ok]))


def _interval(values: np.ndarray, level: float) -> List[float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return [math.nan, math.nan]
    return [float(q) for q in np.quantile(v, [(1 - level) / 2, (1 + level) / 2])]


def analyse(
    grid: Sequence[float],
    passes: Dict[float, Dict[str, np.ndarray]],
    acts: Dict[float, np.ndarray],
    ref_stats: Any,
    train_rows: np.ndarray,
    data_rows: np.ndarray,
    alphas_cumprod: np.ndarray,
    schedule_abar: np.ndarray,
    *,
    num_boot: int = 500,
    seed: int = 0,
    level: float = 0.95,
) -> Dict[str, Any]:
    """Every number of one setting with paired bootstrap intervals (see the module doc).

    :param passes: lambda -> ``run_pass`` rows (the same seeds for every lambda).
    :param acts: lambda -> feature-net pool activations of the pass's images.
    :param ref_stats: ``FIDStatistics`` of the reference set (held fixed).
    :param train_rows: (M, K) training eps norms; ``data_rows``: (M', 2) data moments.
    """
    from evaluations.evaluator import FIDStatistics, bootstrap_fids

    grid = np.asarray(sorted(grid), dtype=np.float64)
    if 1.0 not in grid:
        raise ValueError("the lambda grid must contain 1.0 (the baseline)")
    n = {len(passes[lam]["eps_norm"]) for lam in grid}
    if len(n) != 1:
        raise ValueError(f"every lambda needs the same samples, got {sorted(n)}")
    (num,) = n
    train_rows, data_rows = np.asarray(train_rows), np.asarray(data_rows)

    def summaries(c: np.ndarray, ct: np.ndarray, cd: np.ndarray) -> Dict[str, Any]:
        """Per-lambda objective values and eps gaps under sample weights c (pass rows),
        ct (training rows), cd (data rows)."""
        train_norm = ct @ train_rows / ct.sum()
        data = nl.DataMoments(*(cd @ data_rows / cd.sum()))
        out: Dict[str, Any] = {"objectives": {k: [] for k in OBJECTIVES}, "gap": []}
        for lam in grid:
            p = passes[lam]
            eps = c @ p["eps_norm"] / c.sum()
            states = np.tensordot(c, p["states"], axes=1) / c.sum()
            final = c @ p["final"] / c.sum()
            for k in OBJECTIVES:
                out["objectives"][k].append(
                    objective(
                        k, lam, eps, states, final, train_norm, data, alphas_cumprod, schedule_abar
                    )
                )
            out["gap"].append(
                objective(
                    "norm", lam, eps, states, final, train_norm, data, alphas_cumprod, schedule_abar
                )
            )
        return out

    ones = np.ones(num)
    point = summaries(ones, np.ones(len(train_rows)), np.ones(len(data_rows)))
    ref = ref_stats
    fid_point = np.array(
        [
            FIDStatistics(a.mean(0), np.cov(a, rowvar=False)).frechet_distance(ref)
            for a in (acts[lam] for lam in grid)
        ]
    )
    counts = resample_counts(num, num_boot, seed)
    fid_boot = bootstrap_fids(ref, [acts[lam] for lam in grid], counts)  # (B, L)
    t_counts = resample_counts(len(train_rows), num_boot, seed + 1)
    d_counts = resample_counts(len(data_rows), num_boot, seed + 2)
    boot = [summaries(c, ct, cd) for c, ct, cd in zip(counts, t_counts, d_counts)]
    j1 = int(np.flatnonzero(grid == 1.0)[0])

    roots = {}
    for k in OBJECTIVES:
        value = nl.fractional_root(grid, point["objectives"][k])
        samples = [nl.fractional_root(grid, b["objectives"][k]) for b in boot]
        matches = [closest_match(grid, b["objectives"][k]) for b in boot]
        roots[k] = {
            "lambda": value,
            "interval": _interval(samples, level),
            "no_root_share": float(np.mean(np.isnan(samples))),
            "match": closest_match(grid, point["objectives"][k]),
            "match_interval": _interval(matches, level),
            "values": [float(v) for v in point["objectives"][k]],
        }
    best_boot = np.array([best_lambda(grid, f) for f in fid_boot])
    best = {"lambda": best_lambda(grid, fid_point), "interval": _interval(best_boot, level)}
    lo, hi = best["interval"]
    for r in roots.values():
        r["within_best_interval"] = bool(np.isfinite(r["lambda"]) and lo <= r["lambda"] <= hi)
        r["match_within_best_interval"] = bool(lo <= r["match"] <= hi)
    diffs = fid_boot - fid_boot[:, [j1]]
    gap_boot = np.array([b["gap"][j1] for b in boot])
    return {
        "grid": grid.tolist(),
        "num_samples": int(num),
        "fid": fid_point.tolist(),
        "fid_diff_vs_1": (fid_point - fid_point[j1]).tolist(),
        "fid_diff_interval": [_interval(diffs[:, j], level) for j in range(len(grid))],
        "best_lambda": best,
        "objectives": roots,
        "eps_gap_at_1": {"value": float(point["gap"][j1]), "interval": _interval(gap_boot, level)},
        "num_boot": int(num_boot),
        "level": float(level),
    }


def noise_curves(
    grid: Sequence[float],
    passes: Dict[float, Dict[str, np.ndarray]],
    data_rows: np.ndarray,
    alphas_cumprod: np.ndarray,
    schedule_abar: np.ndarray,
    *,
    num_boot: int = 500,
    seed: int = 0,
    level: float = 0.95,
) -> Dict[str, Any]:
    """``noise_level.curve_intervals`` of the states at every lambda of the grid (paired
    against lambda = 1), as lists for JSON; rows by step index i."""
    runs = {f"{lam:g}": passes[lam]["states"] for lam in sorted(grid)}
    out = nl.curve_intervals(
        runs,
        data_rows,
        alphas_cumprod,
        schedule_abar,
        baseline="1",
        num_boot=num_boot,
        seed=seed,
        level=level,
    )
    return {
        run: {q: {k: np.asarray(v).tolist() for k, v in d.items()} for q, d in qs.items()}
        for run, qs in out.items()
    }


# ----------------------------------------------------------------------------- one setting


def schedule_abar(diffusion: Any) -> np.ndarray:
    """The original (unrespaced) schedule's alphas_cumprod of a (spaced) diffusion, against
    which effective timesteps are read."""
    abar = getattr(diffusion, "original_alphas_cumprod", diffusion.alphas_cumprod)
    return np.asarray(abar, dtype=np.float64)


def study_setting(
    folder: Path,
    model: Callable[..., torch.Tensor],
    diffusion: Any,
    grid: Sequence[float],
    *,
    num_samples: int,
    batch_size: int,
    seed: int,
    shape: Sequence[int],
    device: torch.device,
    num_classes: Optional[int],
    train_x0: torch.Tensor,
    train_kwargs: dict,
    data_rows: np.ndarray,
    score: Callable[[np.ndarray], Any],
    ref_stats: Any,
    num_boot: int = 500,
    level: float = 0.95,
    clip_denoised: bool = True,
    progress: Optional[Callable[[int], None]] = None,
) -> Dict[str, Any]:
    """Everything the study reports for one setting (a model and a step count): a resumable
    ``run_pass`` at every lambda of ``grid`` (in ``folder/lambda_*``), the training eps
    norms on ``train_x0``, ``analyse`` and ``noise_curves``.

    :param score: images (N, H, W, 3) uint8 -> an object with ``pool`` activations and
        ``fid``, ``precision``, ``recall`` (``Evaluator.score`` against the reference).
    :param ref_stats: the reference's ``FIDStatistics`` (what ``score`` compares to).
    """
    grid = sorted({float(v) for v in grid})
    abar_full = schedule_abar(diffusion)
    passes, acts, scores = {}, {}, {}
    for lam in grid:
        passes[lam] = run_pass(
            folder / f"lambda_{lam:g}",
            model,
            diffusion.with_eps_scaler(lam),
            num_samples=num_samples,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
            shape=shape,
            device=device,
            num_classes=num_classes,
            clip_denoised=clip_denoised,
        )
        s = score(passes[lam]["images"])
        acts[lam] = s.pool
        scores[f"{lam:g}"] = {k: float(getattr(s, k)) for k in ("fid", "precision", "recall")}
    train_rows = train_curve(folder, model, diffusion, train_x0, train_kwargs, seed + 1)
    analysis = analyse(
        grid,
        passes,
        acts,
        ref_stats,
        train_rows,
        data_rows,
        diffusion.alphas_cumprod,
        abar_full,
        num_boot=num_boot,
        seed=seed,
        level=level,
    )
    noise = noise_curves(
        grid,
        passes,
        data_rows,
        diffusion.alphas_cumprod,
        abar_full,
        num_boot=num_boot,
        seed=seed,
        level=level,
    )
    timesteps = np.asarray(getattr(diffusion, "timestep_map", range(diffusion.num_timesteps)))
    return {
        **analysis,
        "scores": scores,
        "timesteps": [int(t) for t in timesteps],
        "train_eps_norm": train_rows.mean(0).tolist(),
        "sample_eps_norm": {
            f"{lam:g}": (passes[lam]["eps_norm"].mean(0) / lam).tolist() for lam in grid
        },
        "noise": noise,
    }


def parse_setting(spec: str, num_samples: int, grid: str) -> Dict[str, Any]:
    """``LABEL:MODEL:STEPS[:N[:GRID]]`` (MODEL ``bundled`` or a checkpoint path of the bundled
    architecture; GRID comma-separated lambdas, 1 added) -> a dict; ValueError names the
    problem."""
    parts = spec.split(":", 4)
    if len(parts) < 3 or not parts[0] or not parts[1]:
        raise ValueError(
            f"invalid --settings entry {spec!r}: expected LABEL:MODEL:STEPS[:N[:GRID]], "
            "e.g. bundled_20:bundled:20:400:0.96,0.98,1,1.02"
        )
    label, model, steps = parts[:3]
    try:
        lambdas = sorted(
            {1.0, *(float(v) for v in (parts[4] if len(parts) > 4 else grid).split(","))}
        )
        out = dict(label=label, model=model, steps=int(steps), lambdas=lambdas)
        out["num_samples"] = int(parts[3]) if len(parts) > 3 and parts[3] else num_samples
    except ValueError:
        raise ValueError(
            f"invalid --settings entry {spec!r}: STEPS and N are integers, GRID floats"
        ) from None
    if out["steps"] < 2 or out["num_samples"] < 8 or min(lambdas) <= 0:
        raise ValueError(f"invalid --settings entry {spec!r}: need STEPS >= 2, N >= 8, lambdas > 0")
    if not all(c.isalnum() or c in "_-." for c in label):
        raise ValueError(f"invalid --settings entry label {label!r}: use letters, digits, _ - .")
    return out


def _ci(v: float, interval: Sequence[float], fmt: str = "{:.3f}") -> str:
    lo, hi = interval
    return f"{fmt.format(v)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def format_tables(results: Dict[str, Dict[str, Any]]) -> str:
    """Markdown tables of the study's results (``results.json``): per setting FID(1), the
    FID-optimal lambda, the eps-norm gap and each objective's lambda (95% intervals; * =
    inside the FID-optimal interval), then FID(lambda) - FID(1) per grid point."""
    names = list(OBJECTIVES)
    head = "| setting | N | FID(1) | best lambda | eps gap at 1 (%) | " + " | ".join(
        f"lambda[{n}]" for n in names
    )
    lines = [head + " |", "|" + "---|" * (5 + len(names))]
    for label, r in results.items():
        gap = r["eps_gap_at_1"]
        cells = [
            label,
            str(r["num_samples"]),
            f"{r['fid'][r['grid'].index(1.0)]:.2f}",
            _ci(r["best_lambda"]["lambda"], r["best_lambda"]["interval"]),
            _ci(100 * gap["value"], [100 * v for v in gap["interval"]], "{:+.2f}"),
        ]
        for n in names:
            o = r["objectives"][n]
            mark = " *" if o["within_best_interval"] else ""
            cells.append(_ci(o["lambda"], o["interval"]) + mark)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| setting | best lambda | " + " | ".join(f"match[{n}]" for n in names) + " |"]
    lines.append("|" + "---|" * (2 + len(names)))
    for label, r in results.items():
        cells = [label, _ci(r["best_lambda"]["lambda"], r["best_lambda"]["interval"])]
        for n in names:
            o = r["objectives"][n]
            mark = " *" if o.get("match_within_best_interval") else ""
            cells.append(
                _ci(o.get("match", math.nan), o.get("match_interval", [math.nan] * 2)) + mark
            )
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| setting | lambda: FID(lambda) - FID(1) [95% paired interval] |", "|---|---|"]
    for label, r in results.items():
        cells = [
            f"{lam:g}: {_ci(d, ci, '{:+.2f}')}"
            for lam, d, ci in zip(r["grid"], r["fid_diff_vs_1"], r["fid_diff_interval"])
            if lam != 1.0
        ]
        lines.append(f"| {label} | " + "; ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + format_noise_table(results)


NOISE_TIMES = (100, 300, 500, 700, 900)


def format_noise_table(
    results: Dict[str, Dict[str, Any]], times: Sequence[int] = NOISE_TIMES
) -> str:
    """sigma_eff / sigma_nominal of the sampler's input at the steps nearest ``times`` for
    every lambda of every setting (95% intervals), and its paired difference to lambda = 1."""
    head = "| setting | lambda | " + " | ".join(f"t~{t}" for t in times) + " |"
    lines = [head, "|" + "---|" * (2 + len(times))]
    for label, r in results.items():
        ts = np.asarray(r["timesteps"])
        cols = [int(np.argmin(np.abs(ts - t))) for t in times]
        for lam, q in r["noise"].items():
            v = q["sigma_ratio"]
            cells = [label, lam]
            for i in cols:
                txt = _ci(v["value"][i], [v["low"][i], v["high"][i]]) + f" (t={ts[i]})"
                if lam != "1" and "diff_1" in q:
                    d = q["diff_1"]
                    txt += "; diff " + _ci(d["value"][i], [d["low"][i], d["high"][i]], "{:+.3f}")
                cells.append(txt)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
