"""Figures of the exposure-bias tools and the demo: eps-norm curves, delta_t, the calibration,
FID against lambda, and sample grids side by side.

Figures are drawn with matplotlib's object-oriented API (``matplotlib.figure.Figure``, no
pyplot: no global state, no backend switch for the caller) and written atomically as PNG
(``io_util``). Curves are passed in file row order (noisiest step first) against the
original timestep t, so the x axis runs noisy -> clean from left to right.
"""

from __future__ import annotations

import io
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from .calibration import CalibrationResult
from .exposure_bias import relative_gap
from .io_util import PathLike, atomic_write_bytes, save_png

DPI = 110


def _save(fig: Figure, path: PathLike, dpi: int = DPI) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(buf.getvalue(), path)


def plot_eps_norm(
    path: PathLike,
    t: np.ndarray,
    curves: Dict[str, np.ndarray],
    title: str,
    excluded: Optional[np.ndarray] = None,
) -> Figure:
    """Eps-norm curves against the original timestep (sampling order, left to right) and
    their relative gap to the first curve (the training curve); ``excluded`` (bool per
    row) marks steps left out of a fit with dotted lines."""
    fig = Figure(figsize=(7, 6.5))
    ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
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
    _save(fig, path)
    return fig


def plot_delta(
    path: PathLike,
    t: np.ndarray,
    expected: np.ndarray,
    runs: Dict[str, Dict[str, np.ndarray]],
    title: str,
) -> Figure:
    """sigma_hat_t against sqrt(1 - abar_t), and delta_t, for one or more lambda settings
    (``runs``: label -> ``{"sigma_hat", "delta"}`` as from ``exposure_bias.delta_curve``)."""
    fig = Figure(figsize=(7, 6.5))
    ax, ax2 = fig.subplots(2, 1, sharex=True)
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
    _save(fig, path)
    return fig


def plot_calibration(path: PathLike, result: CalibrationResult) -> Figure:
    """Training curve and the sampling curves at lambda = 1, at uniform b and at linear (k, b)."""
    u, lin = result.uniform, result.linear
    curves = {
        "training": result.train_norm,
        "sampling, lambda = 1": result.baseline.sample_norm,
        f"sampling, b = {u.b:.4f}": u.sample_norm,
        f"sampling, k = {lin.k:.2e}, b = {lin.b:.4f}": lin.sample_norm,
    }
    order = np.arange(result.steps)[::-1]
    return plot_eps_norm(
        path,
        result.timesteps[order],
        {k: v[order] for k, v in curves.items()},
        f"eps_scaler calibration: {result.steps} steps ({result.sampler}), "
        f"{result.num_samples} samples; dotted: steps excluded from the fit",
        excluded=~result.included[order],
    )


def plot_fid_curve(
    path: PathLike,
    rows: Sequence[Mapping[str, Any]],
    *,
    calibrated_b: Optional[float] = None,
    title: str = "FID against lambda, same seeds for every lambda",
    ylabel: str = "FID",
    level: float = 0.95,
) -> Figure:
    """FID against a uniform eps scaler lambda, with the uncertainty of each comparison to
    plain ADM.

    Each row has ``lambda``, ``fid`` and optionally ``diff_interval``: the (lo, hi) interval
    of FID(lambda) - FID(1) at ``level`` (``evaluations.evaluator.paired_bootstrap_fid``
    against the lambda = 1 samples of the same seeds), and ``calibrated`` (True: the point
    at the calibrated b, drawn as a square). An interval is drawn as a bar from FID(1) + lo
    to FID(1) + hi at its lambda: the difference is significant at ``level`` where the bar
    does not cross the dotted FID(1) line. Intervals need a row at lambda = 1.
    """
    if not rows:
        raise ValueError("plot_fid_curve needs at least one row")
    lam = np.array([float(r["lambda"]) for r in rows])
    fid = np.array([float(r["fid"]) for r in rows])
    cal = np.array([bool(r.get("calibrated")) for r in rows])
    has_ci = np.array([r.get("diff_interval") is not None for r in rows])
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    order = np.argsort(lam[~cal], kind="stable")
    ax.plot(lam[~cal][order], fid[~cal][order], "o-", color="C0", label="FID")
    if cal.any():
        ax.plot(lam[cal], fid[cal], "s", color="C3", ms=8, label="FID at the calibrated b")
    base = np.flatnonzero(lam == 1.0)
    if has_ci.any():
        if base.size == 0:
            raise ValueError("the intervals are of FID(lambda) - FID(1): add the lambda = 1 row")
        fid1 = fid[base[0]]
        lo_hi = np.array([r["diff_interval"] for r in rows if r.get("diff_interval") is not None])
        lo_hi = lo_hi.astype(np.float64).reshape(-1, 2)  # (rows with an interval, (lo, hi))
        ax.vlines(
            lam[has_ci],
            fid1 + lo_hi[:, 0],
            fid1 + lo_hi[:, 1],
            color="0.3",
            lw=1.5,
            label=f"{level:.0%} interval of FID(lambda) - FID(1), paired bootstrap",
        )
        for end in (0, 1):
            ax.plot(lam[has_ci], fid1 + lo_hi[:, end], "_", color="0.3", ms=8)
        ax.axhline(fid1, color="gray", ls=":", lw=1)
    if base.size:
        ax.axvline(1.0, color="gray", ls="--", lw=1, label="plain ADM (lambda = 1)")
    if calibrated_b is not None:
        ax.axvline(
            calibrated_b, color="C3", ls=":", lw=1, label=f"calibrated b = {calibrated_b:.4f}"
        )
    ax.set_xlabel("eps scaler lambda (uniform)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path, dpi=120)
    return fig


def plot_sampler_comparison(
    path: PathLike, rows: Sequence[Mapping[str, Any]], *, ylabel: str = "FID"
) -> Figure:
    """FID against the number of sampling steps, one line per method (``compare_samplers``).

    Each row has ``steps``, ``method``, ``fid`` and ``diff_interval`` (the interval of FID -
    FID(adm) at the same steps): the bars around each point span FID(adm) + interval, so a
    method differs from plain ADM beyond the noise where its bar misses the ADM point.
    """
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    base = {r["steps"]: r["fid"] for r in rows if r["method"] == "adm"}
    for n, method in enumerate(methods):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["steps"])
        x = np.array([r["steps"] for r in rs], dtype=np.float64) * (
            1 + 0.015 * (n - len(methods) / 2)
        )
        ax.plot(x, [r["fid"] for r in rs], "o-", ms=4, lw=1.3, label=method)
        if method != "adm":
            lo = [base[r["steps"]] + r["diff_interval"][0] for r in rs]
            hi = [base[r["steps"]] + r["diff_interval"][1] for r in rs]
            ax.vlines(x, lo, hi, color=ax.lines[-1].get_color(), lw=1, alpha=0.6)
    ax.set_xscale("log")
    steps = sorted({r["steps"] for r in rows})
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(ylabel)
    ax.set_title("samplers from the same seeds (bars: 95% interval vs ADM)", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return fig


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list:
    """``text`` broken into lines at spaces so that each fits in ``width`` pixels."""
    lines: list = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def side_by_side(
    grid_paths: Sequence[PathLike], labels: Sequence[str], out: PathLike, *, scale: int = 3
) -> None:
    """Sample grids (PNG) next to each other, each enlarged ``scale`` times (nearest
    neighbour: pixels stay sharp) under its caption, centred and wrapped to the grid's width;
    written to ``out`` as PNG."""
    if len(grid_paths) != len(labels) or not grid_paths:
        raise ValueError(
            f"side_by_side needs one label per grid, got {len(grid_paths)} grids and "
            f"{len(labels)} labels"
        )
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    ims = []
    for p in grid_paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            ims.append(im.resize((im.width * scale, im.height * scale), Image.NEAREST))
    font = _font(14)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    captions = [_wrap(draw, label, font, im.width - 8) for im, label in zip(ims, labels)]
    line_h = int(font.getbbox("Ag")[3]) + 4
    top, gap = 8 + line_h * max(len(c) for c in captions), 16
    canvas = Image.new(
        "RGB",
        (sum(im.width for im in ims) + gap * (len(ims) - 1), top + max(im.height for im in ims)),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    x = 0
    for im, lines in zip(ims, captions):
        for n, line in enumerate(lines):
            w = draw.textlength(line, font=font)
            draw.text((x + (im.width - w) / 2, 4 + n * line_h), line, fill="black", font=font)
        canvas.paste(im, (x, top))
        x += im.width + gap
    save_png(np.asarray(canvas), out)


OBJECTIVE_STYLE = {
    "norm": ("C3", "v"),
    "noise": ("C2", "^"),
    "step1": ("C4", "D"),
    "highfreq": ("C1", "s"),
}


def plot_study_setting(path: PathLike, result: Mapping[str, Any], title: str) -> Figure:
    """One setting of the exposure study (``exposure_study.study_setting``): left, FID(lambda)
    - FID(1) with paired intervals, the FID-optimal lambda and its interval (shaded) and the
    lambda each calibration objective picks; right, the effective noise level of the
    sampler's inputs over the nominal one (sigma_eff / sigma_nominal) at every lambda."""
    fig = Figure(figsize=(12, 4.4))
    ax, bx = fig.subplots(1, 2)
    grid = np.asarray(result["grid"], dtype=np.float64)
    diff = np.asarray(result["fid_diff_vs_1"], dtype=np.float64)
    ci = np.asarray(result["fid_diff_interval"], dtype=np.float64).reshape(-1, 2)
    ax.plot(grid, diff, "o-", color="C0", label="FID(lambda) - FID(1)")
    ax.vlines(grid, ci[:, 0], ci[:, 1], color="0.3", lw=1.5)
    ax.axhline(0, color="gray", ls=":", lw=1)
    best = result["best_lambda"]
    lo, hi = best["interval"]
    if np.isfinite([lo, hi]).all():
        ax.axvspan(lo, hi, color="C0", alpha=0.12, label="FID-optimal lambda, 95% interval")
    ax.axvline(best["lambda"], color="C0", ls="--", lw=1, label=f"best lambda {best['lambda']:.4f}")
    for name, r in result["objectives"].items():
        color, marker = OBJECTIVE_STYLE.get(name, ("k", "x"))
        if np.isfinite(r["lambda"]):
            ax.plot(
                [r["lambda"]], [0], marker, color=color, ms=8, label=f"{name}: {r['lambda']:.4f}"
            )
    ax.set_xlabel("eps scaler lambda (uniform)")
    ax.set_ylabel("FID difference to lambda = 1 (feature-net FID)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    t = np.asarray(result["timesteps"])
    for j, (name, curves) in enumerate(result["noise"].items()):
        q = curves["sigma_ratio"]
        v, lo_, hi_ = (np.asarray(q[k], dtype=np.float64) for k in ("value", "low", "high"))
        keep = np.isfinite(v) & (t > 0)
        bx.plot(t[keep], v[keep], "o-", color=f"C{j}", ms=3, label=f"lambda {name}")
        bx.fill_between(t[keep], lo_[keep], hi_[keep], color=f"C{j}", alpha=0.15)
    bx.axhline(1, color="gray", ls=":", lw=1)
    bx.set_yscale("log")
    lo_y, hi_y = bx.get_ylim()
    bx.set_ylim(max(lo_y, 0.5), min(hi_y, 3.0))  # the noisiest steps' intervals run far out
    bx.invert_xaxis()
    bx.set_xlabel("timestep t of the step's input (sampling runs left to right)")
    bx.set_ylabel("sigma_eff / sigma_nominal of the input")
    bx.set_title("effective noise level of the sampler's inputs (1 = as q(x_t|x_0))", fontsize=10)
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_study_summary(path: PathLike, results: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Every setting of the study on one axis: the FID-optimal lambda with its interval and
    the lambda each calibration objective picks (with its interval)."""
    labels = list(results)
    fig = Figure(figsize=(7.5, 0.55 * len(labels) + 1.8))
    ax = fig.subplots()
    y = np.arange(len(labels))[::-1].astype(np.float64)
    for yi, label in zip(y, labels):
        r = results[label]
        b = r["best_lambda"]
        ax.errorbar(
            [b["lambda"]],
            [yi],
            xerr=[[b["lambda"] - b["interval"][0]], [b["interval"][1] - b["lambda"]]],
            fmt="o",
            color="C0",
            capsize=4,
            label="FID-optimal lambda (95%)" if yi == y[0] else None,
        )
        for k, (name, o) in enumerate(r["objectives"].items()):
            color, marker = OBJECTIVE_STYLE.get(name, ("k", "x"))
            if not np.isfinite(o["lambda"]):
                continue
            off = yi - 0.12 * (k + 1)
            lo, hi = o["interval"]
            err = (
                [[max(o["lambda"] - lo, 0)], [max(hi - o["lambda"], 0)]]
                if np.isfinite([lo, hi]).all()
                else None
            )
            ax.errorbar(
                [o["lambda"]],
                [off],
                xerr=err,
                fmt=marker,
                color=color,
                ms=5,
                lw=1,
                label=name if yi == y[0] else None,
            )
    ax.axvline(1, color="gray", ls="--", lw=1)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("eps scaler lambda")
    ax.set_title("FID-optimal lambda and the lambda each calibration objective picks", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return fig
