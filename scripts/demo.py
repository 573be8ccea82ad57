"""``make demo``: Epsilon Scaling on the bundled Fashion-MNIST ADM, offline, on a CPU.

1. calibrates the eps scaler (closed-loop eps-norm matching, ``calibration.calibrate``) on
   training images;
2. samples the same seeds at every lambda of the sweep and at the calibrated b
   (``sample_util.run_sampling``: resumable), scores each set against the test split with
   the evaluator (``--feature_net fmnist`` features: NOT comparable with Inception FID)
   and a paired bootstrap interval of FID(lambda) - FID(1) over the same seeds;
3. measures the eps-norm curves and delta_t at lambda = 1 and at the calibrated b;
4. writes ``demo_out/``: report.md, results.json, sample grids and plots.

A rerun with the same settings resumes (every sample set and the calibration are kept,
under ``demo_out/runs/<settings>/``).

    python scripts/demo.py [--out_dir demo_out] [--steps 10] [--num_samples 500]
"""

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from evaluations.evaluator import Evaluator, load_feature_net, score_sets
from guided_diffusion import exposure_bias as eb
from guided_diffusion import plots
from guided_diffusion.calibration import CalibrationResult
from guided_diffusion.cli import bundled_model_args, cli, start_script
from guided_diffusion.fast_path import cpu_supports_fast_bf16
from guided_diffusion.flags import make_parser
from guided_diffusion.image_datasets import data_share, prepare_fashion_mnist
from guided_diffusion.io_util import (
    atomic_write_bytes,
    file_sha256,
    settings_folder,
    write_json_atomic,
)
from guided_diffusion.sample_util import build_diffusion, load_sampling_model
from guided_diffusion.seeding import sample_seeds
from guided_diffusion.sweep import (
    SampleSet,
    format_table,
    grid_path,
    load_or_calibrate,
    sample_sets,
)

NOT_COMPARABLE = (
    "FID/sFID/IS/precision/recall use the features of the project's Fashion-MNIST classifier "
    "(--feature_net fmnist): they rank these samples against each other and are NOT comparable "
    "with Inception-based numbers."
)
CALIBRATION = dict(batch_size=128, max_evals=6, max_evals_linear=4)
SETTINGS = ("steps", "num_samples", "batch_size", "seed", "calib_samples", "use_bf16")
# 10 steps: the bundled model's exposure bias is largest there, and 7 sets of 500 samples
# fit in 5 minutes on 2 CPU cores (20 steps: about 6 minutes)
DEFAULTS = dict(
    data_dir="data/fmnist",
    steps=10,
    lambdas="0.96,0.98,0.99,1.0,1.01,1.02",
    num_samples=500,
    batch_size=125,
    use_bf16=True,
)
HELP = dict(
    data_dir="folder of fmnist_{train,test}.npz (made by datasets/fashion_mnist.py when missing)",
    model_path="checkpoint with the bundled model's architecture ('' = the bundled model)",
    use_bf16="the trunk in bfloat16 on CPUs with AVX512-BF16/AMX (faster; samples move by ~1e-2)",
)
NAMES = "out_dir data_dir fmnist_source model_path steps lambdas num_samples calib_samples "
NAMES += "eb_samples batch_size seed threads num_boot use_bf16"


def create_argparser() -> argparse.ArgumentParser:
    return make_parser(__doc__, NAMES.split(), help=HELP, **DEFAULTS)


REPORT = """# ADM-ES demo: Epsilon Scaling on the bundled Fashion-MNIST model

{steps} DDPM steps, {num_samples} samples per lambda (the same seeds), `{model}`; {machine};
{total:.0f} s.

> {note}

## Calibration (closed-loop eps-norm matching)

- uniform: `{uniform}` (standard error of b {b_se:.4f})
- linear: `{linear}`

![calibration](calibration.png)

## FID against lambda (95% paired bootstrap interval of FID(lambda) - FID(1))

{rows}

The test split against itself ({num_samples} images): FID {floor:.2f}, the floor at this size.

![FID vs lambda](fid_vs_lambda.png)

## Plain ADM and ADM-ES, same seeds

![grids](grids_adm_vs_es.png)

## Exposure bias

Mean relative gap of the sampling eps-norm to the training curve before the last step:
{gaps}. Calibrated b above 1: {above}. Best lambda of the sweep: {best:g}; better than
lambda = 1 beyond the noise: {significant}.

![eps norm](eps_norm.png)

![delta_t](delta_t.png)
"""


def report(r: dict, cal: CalibrationResult) -> str:
    """``report.md`` from the results."""
    e = r["effect"]
    return REPORT.format(
        **r,
        total=r["seconds"]["total"],
        uniform=cal.flags("uniform"),
        linear=cal.flags("linear"),
        b_se=cal.uniform_b_se,
        rows=format_table(sorted(r["sweep"], key=lambda x: x["lambda"]), "lambda", True),
        floor=r["test_split_floor"]["fid"],
        gaps=", ".join(f"{k}: {v:+.2%}" for k, v in e["eps_norm_gap_before_last"].items()),
        above=e["calibrated_b_above_1"],
        best=e["best_lambda"],
        significant=e["best_beyond_noise"],
    )


def main() -> None:
    args = start_script(create_argparser(), "evaluate")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    lambdas = sorted({1.0, *(float(x) for x in args.lambdas.split(",") if x.strip())})
    t_start, times, out = time.time(), {}, Path(args.out_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = prepare_fashion_mnist(args.data_dir, args.fmnist_source)
    bf16 = args.use_bf16 and device.type == "cpu" and cpu_supports_fast_bf16()
    m = bundled_model_args(args.model_path, timestep_respacing=str(args.steps), use_bf16=bf16)
    model = load_sampling_model(m, device)
    base = build_diffusion(m)
    settings = dict({k: getattr(args, k) for k in SETTINGS}, model=file_sha256(m.model_path))
    run_dir = settings_folder(out, settings)  # a rerun with these settings resumes from here
    geometry = dict(image_size=m.image_size, class_cond=m.class_cond, in_channels=m.in_channels)
    print(f"{m.model_path}: {args.steps} DDPM steps on {device}; writing {out}", flush=True)

    def share(n: int, seed: int):  # the first n training images, their labels and seeds
        share = data_share(str(data["train"]), n, None, **geometry, rank=0, world=1, device=device)
        idx, x0, kw = next(share)
        return x0, kw, sample_seeds(seed, idx)

    # 1. calibration: closed-loop eps-norm matching on training images
    t0 = time.time()
    cal = load_or_calibrate(
        run_dir / "calibration.json",
        model,
        base,
        lambda: share(args.calib_samples, args.seed),
        **CALIBRATION,
    )
    plots.plot_calibration(out / "calibration.png", cal)
    b_cal, times["calibration"] = round(float(cal.uniform.b), 4), time.time() - t0
    print(f"calibrated: {cal.flags('uniform')} (s.e. {cal.uniform_b_se:.4f})", flush=True)

    # 2. the sweep: the same seeds at every lambda, scored against the test split
    t0 = time.time()
    specs = [SampleSet(f"{lam:g}", base.with_eps_scaler(lam)) for lam in sorted({*lambdas, b_cal})]
    sets = sample_sets(
        model,
        specs,
        run_dir=run_dir,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        shape=(m.in_channels, m.image_size, m.image_size),
        seed=args.seed,
        device=device,
        num_classes=m.num_classes if m.class_cond else None,
    )
    ev = Evaluator(
        load_feature_net("fmnist", device=str(device)), 500, device=str(device), progress=False
    )
    with np.load(data["test"]) as z:
        ref, test_images = ev.reference(z["arr_0"]), z["arr_0"][: args.num_samples]
    scores = score_sets(ev, sets, ref, "1", args.num_boot, args.seed)
    sweep = [
        dict(s, name=k, **{"lambda": float(k), "calibrated": float(k) == b_cal})
        for k, s in scores.items()
    ]
    print(format_table(sweep, "lambda"), flush=True)
    times["sweep"] = time.time() - t0
    plots.plot_fid_curve(
        out / "fid_vs_lambda.png",
        sweep,
        calibrated_b=b_cal,
        title=f"FID vs lambda, {args.steps} steps, {args.num_samples} samples",
        ylabel="FID (Fashion-MNIST classifier features)",
    )
    grids = [grid_path(run_dir, f"{lam:g}", args.num_samples, m.image_size) for lam in (1, b_cal)]
    plots.side_by_side(
        grids,
        ["plain ADM (eps_scaler 1.0)", f"ADM-ES (calibrated {b_cal:g})"],
        out / "grids_adm_vs_es.png",
    )

    # 3. exposure bias: eps norms and delta_t at lambda = 1 and at the calibrated b
    t0 = time.time()
    x0, kw, seeds = share(args.eb_samples, args.seed + 1)
    curves, deltas = eb.lambda_curves(base, model, x0, seeds, sorted({1.0, b_cal}), model_kwargs=kw)
    times["exposure_bias"] = time.time() - t0
    order = np.arange(args.steps)[::-1]  # file rows: the noisiest step first
    t_rows = eb.original_timesteps(base)[order]
    curves = {k: v[order] for k, v in curves.items()}
    runs = {
        f"lambda {k:g}": {n: v[order] for n, v in d.items() if np.ndim(v)}
        for k, d in deltas.items()
    }
    plots.plot_eps_norm(
        out / "eps_norm.png",
        t_rows,
        curves,
        f"eps L2-norm, {args.steps} steps (sampling: eps / lambda)",
    )
    plots.plot_delta(
        out / "delta_t.png",
        t_rows,
        runs["lambda 1"]["expected_sigma"],
        runs,
        f"delta_t, {args.steps} steps, {args.eb_samples} training images",
    )

    # 4. results: did the paper's effect show?
    best = min((r for r in sweep if not r["calibrated"]), key=lambda r: r["fid"])
    gap = {
        k: float(np.mean(eb.relative_gap(v, curves["training"])[:-1]))  # before the last
        for k, v in curves.items()
        if k != "training"
    }
    effect = dict(
        eps_norm_gap_before_last=gap,
        calibrated_b_above_1=b_cal > 1,
        best_lambda=best["lambda"],
        best_beyond_noise=best["diff_interval"][1] < 0,
    )
    times["total"] = time.time() - t_start
    results = dict(
        steps=args.steps,
        num_samples=args.num_samples,
        seed=args.seed,
        sweep=sweep,
        calibration=cal.to_json(),
        calibrated_b=b_cal,
        effect=effect,
        test_split_floor=ev.score(test_images, ref).as_dict(),
        eps_norm={k: v.tolist() for k, v in curves.items()},
        delta_t={k: v["delta"].tolist() for k, v in runs.items()},
        timesteps=t_rows.tolist(),
        model=m.model_path,
        note=NOT_COMPARABLE,
        seconds={k: round(v, 1) for k, v in times.items()},
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, bf16 autocast {bf16}",
    )
    write_json_atomic(out / "results.json", results)
    atomic_write_bytes(report(results, cal).encode(), out / "report.md")
    print(
        f"effect: {json.dumps(effect)}\nwrote {out}/report.md, results.json, grids and plots "
        f"in {times['total']:.0f} s\n{NOT_COMPARABLE}"
    )


if __name__ == "__main__":
    cli(main)
