"""Samplers and exposure-bias fixes side by side on one checkpoint, from the same seeds.

    python scripts/compare_samplers.py --ref_batch REF.npz [--model_path M.pt model flags] \
        --steps_list 10,20,50 --num_samples 1000 --out_dir runs/compare

For every step count: plain ADM (DDPM), ADM-ES (DDPM with --es_scaler b, or the b calibrated
by calibrate_eps_scaler's method), time shift (TS-DPM) with and without ES, DDIM with eta 0
and 1, DPM-Solver++(2M) with and without ES. Image i of every set comes from the same seed;
each set is scored against --ref_batch (FID, sFID, precision, recall) with the paired
bootstrap interval of FID - FID(ADM at the same steps). Writes table.md, results.json and
comparison.png to --out_dir; a rerun resumes. Without --model_path: the bundled model and
its reference (the Fashion-MNIST test split, --feature_net fmnist).
"""

import argparse
from pathlib import Path

from evaluations.evaluator import Evaluator, load_feature_net, score_sets
from guided_diffusion import dist_util, plots
from guided_diffusion.cli import UserError, cli, start_script
from guided_diffusion.flags import DIFFUSION_FLAGS, MODEL_FLAGS, make_parser
from guided_diffusion.image_datasets import data_share
from guided_diffusion.io_util import atomic_write_bytes, settings_folder, write_json_atomic
from guided_diffusion.sample_util import build_diffusion, load_sampling_model
from guided_diffusion.seeding import sample_seeds
from guided_diffusion.sweep import (
    METHODS,
    format_table,
    load_or_calibrate,
    method_sets,
    sample_sets,
)

NAMES = "ref_batch feature_net data_dir steps_list methods es_scaler calib_samples num_samples "
NAMES += "batch_size seed num_boot out_dir ts_cutoff ts_window model_path channels_last progress"
OUT_DIR = "runs/compare_samplers"
RUN = ("model_path", "num_samples", "batch_size", "seed", "ts_cutoff", "ts_window")


def create_argparser() -> argparse.ArgumentParser:
    names = NAMES.split() + MODEL_FLAGS + DIFFUSION_FLAGS
    return make_parser(__doc__, names, num_samples=1000, batch_size=125, out_dir=OUT_DIR)


def main() -> None:
    args = start_script(create_argparser(), "sample")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if dist_util.get_world_size() > 1 or not args.ref_batch or "adm" not in methods:
        raise UserError("compare_samplers.py runs as one process and needs --ref_batch and adm")
    device, out = dist_util.dev(), Path(args.out_dir)
    model = load_sampling_model(args, device)
    ev = Evaluator(load_feature_net(args.feature_net, device=str(device)), device=str(device))
    ref = ev.read_reference(args.ref_batch)
    run = {k: getattr(args, k) for k in RUN}
    rows = []
    for steps in [int(s) for s in args.steps_list.split(",") if s.strip()]:
        base = build_diffusion(
            argparse.Namespace(**dict(vars(args), timestep_respacing=f"{steps}"))
        )
        b = args.es_scaler
        if not b and any(METHODS[m][1] for m in methods if m in METHODS):
            b = calibrated_b(args, model, base, out, steps, run)
        sets = method_sets(
            base, methods, b, f"{steps}_", ts_cutoff=args.ts_cutoff, ts_window=args.ts_window
        )
        images = sample_sets(
            model,
            sets,
            run_dir=settings_folder(out, dict(steps=steps, b=b, **run)),
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            seed=args.seed,
            shape=(args.in_channels, args.image_size, args.image_size),
            device=device,
            num_classes=args.num_classes if args.class_cond else None,
            progress=args.progress,
        )
        scores = score_sets(ev, images, ref, f"{steps}_adm", args.num_boot, args.seed)
        rows += [
            dict(s, name=k, steps=steps, method=k.split("_", 1)[1], b=b) for k, s in scores.items()
        ]
        print(format_table([r for r in rows if r["steps"] == steps], "method"), flush=True)
    write_json_atomic(out / "results.json", dict(rows=rows, flags=vars(args)))
    atomic_write_bytes(
        (format_table(rows, "method", markdown=True) + "\n").encode(), out / "table.md"
    )
    plots.plot_sampler_comparison(out / "comparison.png", rows)
    print(f"wrote {out}/table.md, results.json and comparison.png", flush=True)


def calibrated_b(args, model, base, out: Path, steps: int, run: dict) -> float:
    """b of closed-loop eps-norm matching (calibration.calibrate) for this step count."""
    if not args.data_dir:
        raise UserError("--es_scaler 0 calibrates b on training images: pass --data_dir")

    def inputs():
        share = data_share(
            args.data_dir,
            args.calib_samples,
            None,
            image_size=args.image_size,
            class_cond=args.class_cond,
            in_channels=args.in_channels,
            rank=0,
            world=1,
            device=dist_util.dev(),
        )
        idx, x0, kw = next(share)
        return x0, kw, sample_seeds(args.seed, idx)

    folder = settings_folder(out, dict(calibration=steps, n=args.calib_samples, **run))
    cal = load_or_calibrate(
        folder / "calibration.json",
        model,
        base,
        inputs,
        batch_size=args.batch_size,
        max_evals=6,
        max_evals_linear=2,
    )
    print(f"{steps} steps: calibrated {cal.flags('uniform')}", flush=True)
    return round(float(cal.uniform.b), 4)


if __name__ == "__main__":
    cli(main)
