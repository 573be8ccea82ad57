"""``make demo``: the eps_scaler study on the bundled Fashion-MNIST ADM, offline, on a CPU.

1. calibrates the eps scaler (uniform b and linear (k, b)) with ``calibrate_eps_scaler``'s
   closed-loop eps-norm matching, on training images;
2. samples the same seeds at every lambda of the sweep (and at the calibrated b) with the
   sampler of ``image_sample.py`` and scores each set against the Fashion-MNIST test split
   with the evaluator's ``--feature_net fmnist`` (FID, sFID, Inception Score, precision,
   recall; NOT comparable with Inception-based numbers);
3. measures delta_t and the eps-norm curves (consecutive sampling from forward-diffused
   training images) at lambda = 1 and at the best lambda of the sweep;
4. writes ``demo_out/``: ``report.md``, ``results.json``, sample grids and plots.

Rerunning with the same settings and ``--out_dir`` resumes: the calibration and every
sample set already written (``run.json`` records the settings they were made with) are
reused, so an interrupted run loses at most the set it was drawing.

    python scripts/demo.py [--out_dir demo_out] [--steps 20] [--num_samples 256]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List

import numpy as np
import torch

from guided_diffusion import exposure_bias as eb
from guided_diffusion.sample_util import (
    BUNDLED_FLAGS,
    BUNDLED_MODEL,
    REPO_ROOT,
    UserError,
    batch_seed,
    build_diffusion,
    cli,
    generate_batch,
    load_unet,
    optimize_for_sampling,
    save_image_grid,
    save_npz_atomic,
)
from guided_diffusion.script_util import model_and_diffusion_defaults
from guided_diffusion.train_util import atomic_write_bytes

NOT_COMPARABLE = (
    "FID/sFID/IS/precision/recall here use the features of the project's Fashion-MNIST "
    "classifier (--feature_net fmnist): they rank these samples against each other and are "
    "NOT comparable with Inception-based numbers."
)
DEFAULT_LAMBDAS = "0.98,0.99,1.0,1.005,1.01,1.02,1.03,1.05"


def create_argparser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out_dir", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument(
        "--data_dir",
        default="data/fmnist",
        help="where fmnist_{train,test}.npz are (made by datasets/fashion_mnist.py "
        "if missing) (default: data/fmnist)",
    )
    p.add_argument(
        "--fmnist_source",
        default="",
        help="folder of the Fashion-MNIST IDX files, used when --data_dir lacks the .npz "
        "files (default: Debian's /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument("--model_path", default="", help="checkpoint (default: the bundled model)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    p.add_argument(
        "--lambdas",
        default=DEFAULT_LAMBDAS,
        help=f"uniform eps scalers of the sweep (default: {DEFAULT_LAMBDAS})",
    )
    p.add_argument(
        "--num_samples",
        type=int,
        default=256,
        help="samples per lambda, the same seeds for every lambda (default: 256)",
    )
    p.add_argument(
        "--calib_samples",
        type=int,
        default=128,
        help="training images for the calibration (default: 128)",
    )
    p.add_argument(
        "--eb_samples",
        type=int,
        default=128,
        help="training images for delta_t and the eps norms (default: 128)",
    )
    p.add_argument("--batch_size", type=int, default=64, help="sampling batch (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of every draw (default: 0)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    return p


def ensure_data(data_dir: Path, source: str = "") -> Dict[str, Path]:
    """The Fashion-MNIST .npz files, made from the IDX files (Debian's) when missing.

    Runs ``datasets/fashion_mnist.py`` in its own process, exactly as a user would.
    """
    paths = {s: data_dir / f"fmnist_{s}.npz" for s in ("train", "test")}
    if not all(p.exists() for p in paths.values()):
        print(f"preparing Fashion-MNIST in {data_dir} ...", flush=True)
        cmd = [
            sys.executable,
            str(REPO_ROOT / "datasets" / "fashion_mnist.py"),
            "--out_dir",
            str(data_dir),
            "--no_png",
        ]
        if source:
            cmd += ["--source", source]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines() or ["unknown error"]
            raise UserError(f"cannot prepare Fashion-MNIST in {data_dir}: {lines[-1]}")
    return paths


def model_args(args: argparse.Namespace) -> SimpleNamespace:
    """The flags of the bundled model (or of --model_path with the bundled flags)."""
    for path in (args.model_path or BUNDLED_MODEL, BUNDLED_FLAGS):
        if not Path(path).exists():
            raise UserError(f"model not found: {path}")
    meta = json.loads(BUNDLED_FLAGS.read_text())
    flags = dict(model_and_diffusion_defaults(), **meta["flags"])
    flags.update(
        model_path=args.model_path or str(BUNDLED_MODEL),
        timestep_respacing=str(args.steps),
        eps_scaler=1.0,
        eps_scaler_k=0.0,
        use_fp16=False,
        use_bf16=False,
        channels_last=True,
        compile=False,
    )
    return SimpleNamespace(**flags)


def sample_set(model, diffusion, margs, n: int, batch: int, seed: int, device) -> np.ndarray:
    """``n`` images, global batch j seeded by (seed, j): image_sample.py's draws."""
    out = []
    for j in range(math.ceil(n / batch)):
        g = torch.Generator(device=device).manual_seed(batch_seed(seed, j))
        size = min(batch, n - j * batch)
        images, _ = generate_batch(
            model,
            diffusion,
            size,
            g,
            image_size=margs.image_size,
            device=device,
            clip_denoised=True,
        )
        out.append(images)
    return np.concatenate(out)


def score(evaluator, ref, images: np.ndarray) -> Dict[str, float]:
    """The evaluator's five numbers for ``images`` against the reference activations."""
    pool, spatial = evaluator.compute_activations([images])
    stats = evaluator.compute_statistics(pool)
    stats_s = evaluator.compute_statistics(spatial)
    precision, recall = evaluator.compute_prec_recall(ref["pool"], pool)
    with warnings.catch_warnings():
        # with fewer samples than spatial features (256) the sample covariance is singular
        # and the evaluator takes the original's eps * I fallback, as it should
        warnings.filterwarnings("ignore", message=".*singular product.*")
        sfid = float(stats_s.frechet_distance(ref["stats_s"]))
    return {
        "fid": float(stats.frechet_distance(ref["stats"])),
        "sfid": sfid,
        "inception_score": float(evaluator.compute_inception_score(pool)),
        "precision": float(precision),
        "recall": float(recall),
    }


def load_images(path: Path, n: int, seed: int) -> torch.Tensor:
    """``n`` images of an npz (a seeded random subset), as float NCHW in [-1, 1]."""
    with np.load(path) as z:
        arr = z["arr_0"]
        idx = np.sort(np.random.default_rng(seed).choice(len(arr), size=n, replace=False))
        x = arr[idx]
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1


def side_by_side(grids: List[Path], labels: List[str], out: Path) -> None:
    """Paste PNG grids next to each other with a caption above each."""
    from PIL import Image, ImageDraw

    ims = [Image.open(p).convert("RGB") for p in grids]
    scale = 3
    ims = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in ims]
    top, gap = 28, 16
    w = sum(im.width for im in ims) + gap * (len(ims) - 1)
    h = max(im.height for im in ims) + top
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for im, label in zip(ims, labels):
        canvas.paste(im, (x, top))
        draw.text((x + 4, 6), label, fill="black")
        x += im.width + gap
    canvas.save(out)


def plot_fid_curve(path: Path, sweep: List[dict], calibrated_b: float, steps: int) -> None:
    plt = eb._pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    grid = sorted((r for r in sweep if not r.get("calibrated")), key=lambda r: r["lambda"])
    ax.plot([r["lambda"] for r in grid], [r["fid"] for r in grid], "o-", label="sweep")
    cal = [r for r in sweep if r.get("calibrated")]
    if cal:
        ax.plot(
            [cal[0]["lambda"]],
            [cal[0]["fid"]],
            "s",
            color="C3",
            ms=8,
            label=f"calibrated b = {calibrated_b:.4f}",
        )
    ax.axvline(calibrated_b, color="C3", ls=":", lw=1)
    ax.axvline(1.0, color="gray", ls="--", lw=1)
    ax.set_xlabel("eps scaler lambda (uniform)")
    ax.set_ylabel("FID (Fashion-MNIST classifier features)")
    ax.set_title(f"FID vs lambda, {steps} steps, same seeds for every lambda")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_settings(args: argparse.Namespace, margs, data: Dict[str, Path]) -> dict:
    """What the outputs depend on; a rerun reuses earlier outputs only when these match."""
    digest = hashlib.sha256(Path(margs.model_path).read_bytes()).hexdigest()
    return {
        "model_sha256": digest,
        "data": {k: str(Path(v).resolve()) for k, v in sorted(data.items())},
        **{
            k: getattr(args, k)
            for k in ("steps", "num_samples", "calib_samples", "batch_size", "seed")
        },
    }


def reusable(out: Path, settings: dict) -> bool:
    """Whether ``out`` holds outputs of a run with these settings (and records them if not)."""
    path = out / "run.json"
    if path.exists():
        try:
            if json.loads(path.read_text()) == settings:
                return True
        except ValueError:
            pass
        print(f"{path}: settings changed, starting over", flush=True)
    atomic_write_bytes(json.dumps(settings, indent=1).encode(), str(path))
    return False


def load_samples(path: Path, n: int):
    """The samples at ``path`` if it holds ``n`` of them, else None."""
    if not path.exists():
        return None
    try:
        with np.load(path) as z:
            images = z["arr_0"]
    except Exception:
        return None
    return images if len(images) == n else None


def calibration_from_json(d: dict) -> SimpleNamespace:
    """The parts of a saved calibration the demo reports (see CalibrationResult.to_json)."""
    flags = {"uniform": d["uniform"]["flags"], "linear": d["linear"]["flags"]}
    return SimpleNamespace(
        uniform=SimpleNamespace(b=d["uniform"]["b"]),
        linear=SimpleNamespace(k=d["linear"]["k"], b=d["linear"]["b"]),
        uniform_b_se=d["uniform"]["b_se"] if d["uniform"]["b_se"] is not None else math.nan,
        flags=flags.__getitem__,
    )


def main() -> None:
    args = create_argparser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        lambdas = sorted({float(x) for x in args.lambdas.split(",")})
    except ValueError:
        raise UserError(
            f"--lambdas must be comma-separated numbers, got {args.lambdas!r}"
        ) from None
    if 1.0 not in lambdas:
        raise UserError("--lambdas must include 1.0 (plain ADM, the baseline of the comparison)")
    for name in ("num_samples", "calib_samples", "eb_samples", "batch_size", "steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    data = ensure_data(Path(args.data_dir), args.fmnist_source)
    margs = model_args(args)
    print(f"model: {margs.model_path} ({args.steps} steps, DDPM, {device})", flush=True)
    model = optimize_for_sampling(load_unet(margs, device), margs, device)
    base = build_diffusion(margs)
    timings: Dict[str, float] = {}

    resume = reusable(out, run_settings(args, margs, data))

    # 1. calibration (closed-loop eps-norm matching on training images)
    t0 = time.time()
    cal_path = out / "calibration.json"
    if resume and cal_path.exists():
        cal = calibration_from_json(json.loads(cal_path.read_text()))
        print(f"reusing {cal_path}", flush=True)
    else:
        x_cal = load_images(data["train"], args.calib_samples, args.seed).to(device)
        cal = eb.calibrate(
            model,
            base,
            x_cal,
            seeds=eb.sample_seeds(args.seed, range(len(x_cal))),
            batch_size=args.batch_size,
        )
        eb.plot_calibration(out / "calibration.png", cal)
        atomic_write_bytes(json.dumps(cal.to_json(), indent=1).encode(), str(cal_path))
    b_cal = float(cal.uniform.b)
    timings["calibration"] = time.time() - t0
    print(
        f"calibrated: {cal.flags('uniform')}  |  linear: {cal.flags('linear')}  "
        f"(b +- {cal.uniform_b_se:.4f}, {timings['calibration']:.0f} s)",
        flush=True,
    )

    # 2. the sweep: the same seeds at every lambda, scored on the test split
    from evaluations.evaluator import Evaluator, load_feature_net

    t0 = time.time()
    evaluator = Evaluator(
        load_feature_net("fmnist", device=str(device)),
        batch_size=500,
        device=str(device),
        progress=False,
    )
    with np.load(data["test"]) as z:
        test_images = z["arr_0"]
    pool, spatial = evaluator.compute_activations([test_images])
    ref = {
        "pool": pool,
        "stats": evaluator.compute_statistics(pool),
        "stats_s": evaluator.compute_statistics(spatial),
    }
    test_scores = score(evaluator, ref, test_images[: args.num_samples])
    sweep = []
    points = [(lam, False) for lam in lambdas] + [(round(b_cal, 4), True)]
    for lam, calibrated in points:
        path = out / f"samples_lambda{lam:g}.npz"
        images = load_samples(path, args.num_samples) if resume else None
        if images is None:
            diffusion = base.with_eps_scaler(lam)
            images = sample_set(
                model, diffusion, margs, args.num_samples, args.batch_size, args.seed, device
            )
            save_npz_atomic(path, arr_0=images)
        save_image_grid(images, out / f"grid_lambda{lam:g}.png")
        row = {"lambda": lam, **score(evaluator, ref, images)}
        if calibrated:
            row["calibrated"] = True
        sweep.append(row)
        print(
            f"lambda {lam:<7g} FID {row['fid']:8.2f}  sFID {row['sfid']:7.2f}  "
            f"IS {row['inception_score']:5.2f}  P {row['precision']:.3f}  "
            f"R {row['recall']:.3f}{'  (calibrated b)' if calibrated else ''}",
            flush=True,
        )
    timings["sweep"] = time.time() - t0
    grid_rows = [r for r in sweep if not r.get("calibrated")]
    best = min(grid_rows, key=lambda r: r["fid"])
    best_lambda = best["lambda"]
    plot_fid_curve(out / "fid_vs_lambda.png", sweep, b_cal, args.steps)
    side_by_side(
        [out / "grid_lambda1.png", out / f"grid_lambda{round(b_cal, 4):g}.png"],
        ["plain ADM (eps_scaler 1.0)", f"ADM-ES, calibrated eps_scaler {round(b_cal, 4):g}"],
        out / "grids_adm_vs_es.png",
    )

    # 3. exposure bias (delta_t) and eps norms at lambda = 1 and at the best lambda
    t0 = time.time()
    x_eb = load_images(data["train"], args.eb_samples, args.seed + 1).to(device)
    seeds = eb.sample_seeds(args.seed + 1, range(len(x_eb)))
    train_norm = eb.train_eps_norms(base, model, x_eb, seeds).mean(axis=0)
    runs, norms = {}, {"training": train_norm}
    for name, lam in (("1.0", 1.0), ("best", best_lambda)):
        res = eb.sampling_pass(base.with_eps_scaler(lam), model, x_eb, seeds, with_moments=True)
        runs[name] = eb.delta_curve(res.moments, res.final, base.alphas_cumprod)
        norms[f"sampling, lambda {lam:g}"] = res.eps_norm.mean(axis=0) / res.lam
    timings["exposure_bias"] = time.time() - t0
    t_orig = eb.original_timesteps(base)
    order = np.arange(args.steps)[::-1]  # noisiest first
    eb.plot_delta(
        out / "delta_t.png",
        t_orig[order],
        runs["1.0"]["expected_sigma"][order],
        {
            f"lambda {lam:g}": {k: v[order] if np.ndim(v) else v for k, v in runs[n].items()}
            for n, lam in (("1.0", 1.0), ("best", best_lambda))
        },
        f"delta_t, {args.steps} steps, {args.eb_samples} training images",
    )
    eb.plot_eps_norm(
        out / "eps_norm.png",
        t_orig[order],
        {k: v[order] for k, v in norms.items()},
        f"eps L2-norm, {args.steps} steps (sampling: eps / lambda)",
    )

    # 4. results
    total = time.time() - t_start
    results = {
        "steps": args.steps,
        "calibrated_b": b_cal,
        "calibrated_b_se": cal.uniform_b_se,
        "calibrated_linear": {"k": float(cal.linear.k), "b": float(cal.linear.b)},
        "best_lambda": best_lambda,
        "sweep": sweep,
        "delta_mean": {k: float(np.mean(r["delta"])) for k, r in runs.items()},
        "delta_t": {k: [float(v) for v in r["delta"][order]] for k, r in runs.items()},
        "eps_norm": {k: [float(x) for x in v[order]] for k, v in norms.items()},
        "timesteps": [int(t) for t in t_orig[order]],
        "test_split_vs_itself": test_scores,
        "num_samples": args.num_samples,
        "seed": args.seed,
        "model": str(margs.model_path),
        "feature_net": "fmnist",
        "note": NOT_COMPARABLE,
        "seconds": {**{k: round(v, 1) for k, v in timings.items()}, "total": round(total, 1)},
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}",
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(out / "report.md", results, cal)
    print_table(results)
    print(f"\nwrote {out}/report.md, results.json, grids and plots in {total:.0f} s")


def print_table(results: dict) -> None:
    print(
        f"\neps_scaler sweep, {results['steps']} steps, {results['num_samples']} samples each "
        "(same seeds)"
    )
    print(f"{'lambda':>8} {'FID':>8} {'sFID':>8} {'IS':>6} {'prec':>6} {'recall':>6}")
    for r in sorted(results["sweep"], key=lambda r: r["lambda"]):
        mark = " <- calibrated b" if r.get("calibrated") else ""
        mark += (
            " <- best" if r["lambda"] == results["best_lambda"] and not r.get("calibrated") else ""
        )
        print(
            f"{r['lambda']:>8g} {r['fid']:>8.2f} {r['sfid']:>8.2f} {r['inception_score']:>6.2f} "
            f"{r['precision']:>6.3f} {r['recall']:>6.3f}{mark}"
        )
    d = results["delta_mean"]
    print(
        f"mean delta_t: lambda 1.0 {d['1.0']:.3g}, best lambda {results['best_lambda']:g} "
        f"{d['best']:.3g}"
    )
    print(NOT_COMPARABLE)


def write_report(path: Path, r: dict, cal) -> None:
    rows = "\n".join(
        f"| {x['lambda']:g}{' (calibrated)' if x.get('calibrated') else ''} | {x['fid']:.2f} | "
        f"{x['sfid']:.2f} | {x['inception_score']:.2f} | {x['precision']:.3f} | "
        f"{x['recall']:.3f} |"
        for x in sorted(r["sweep"], key=lambda x: x["lambda"])
    )
    t = r["test_split_vs_itself"]
    lines = [
        "# ADM-ES demo: eps_scaler on the bundled Fashion-MNIST model",
        "",
        f"{r['steps']} DDPM steps, {r['num_samples']} samples per lambda with the same seeds, "
        f"model `{r['model']}`; {r['machine']}; {r['seconds']['total']:.0f} s in all.",
        "",
        f"> {NOT_COMPARABLE}",
        "",
        "## Calibration (closed-loop eps-norm matching, `calibrate_eps_scaler.py`)",
        "",
        f"- uniform: `{cal.flags('uniform')}` (standard error of b {r['calibrated_b_se']:.4f})",
        f"- linear: `{cal.flags('linear')}`",
        "",
        "![calibration](calibration.png)",
        "",
        "## FID versus lambda",
        "",
        "| lambda | FID | sFID | IS | precision | recall |",
        "|---|---|---|---|---|---|",
        rows,
        "",
        f"Best lambda of the sweep: **{r['best_lambda']:g}**; calibrated b: "
        f"**{r['calibrated_b']:.4f}**. For scale, {r['num_samples']} test images against the "
        f"whole test split: FID {t['fid']:.2f}, precision {t['precision']:.3f}, recall "
        f"{t['recall']:.3f} (the floor that sample size allows).",
        "",
        "![FID vs lambda](fid_vs_lambda.png)",
        "",
        "## Samples: plain ADM and ADM-ES (same seeds)",
        "",
        "![grids](grids_adm_vs_es.png)",
        "",
        "## Exposure bias",
        "",
        f"Mean delta_t over the {r['steps']} steps: lambda 1.0: {r['delta_mean']['1.0']:.3g}; "
        f"best lambda {r['best_lambda']:g}: {r['delta_mean']['best']:.3g}.",
        "",
        "![delta_t](delta_t.png)",
        "",
        "![eps norm](eps_norm.png)",
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    cli(main)
