"""Calibrate Epsilon Scaling from a few hundred samples: uniform b and linear (k, b).

    python scripts/calibrate_eps_scaler.py --model_path MODEL.pt [model flags] \
        --timestep_respacing 20 --data_dir train.npz --num_samples 128 --log_dir OUT

Finds the lambda_i = k * i + b (i = sampling step, 0 = last) under which the sampling
eps-norm curve lies on the training curve (Ning et al., ICLR 2024, "Epsilon L2-norm"),
measured in closed loop: every candidate lambda samples the batch again, from the same x_T
and noise, and its curve is ||eps_theta / lambda_i|| along that trajectory. The objective
is the relative gap g_i = sample_i / train_i - 1 over the steps not in --exclude_steps
(default 0, the last step: an outlier at every lambda):

* uniform b: mean_i g_i(b) = 0, by a safeguarded secant search in --b_range to --tol;
* linear (k, b): mean_i g_i = 0 and no linear trend of g_i in i, by Broyden's method
  started at (0, b_uniform) with a closed-loop Jacobian.

Prints the flags to paste (``--eps_scaler B --eps_scaler_k K``, one line per fit) and
writes ``calibration.json`` (both fits, their gaps, the standard error of b, every
evaluation), ``calibration.npz`` (the training curve and the sampling curves at lambda = 1,
uniform b, linear (k, b) and of every evaluation, by step index i) and ``calibration.png``
to --log_dir. The model's own --eps_scaler/--eps_scaler_k are not used.
"""

import argparse
import json
import os

from guided_diffusion import dist_util, flags, logger
from guided_diffusion import exposure_bias as eb
from guided_diffusion.calibration import CalibrationResult, Evaluation, calibrate
from guided_diffusion.cli import UserError, cli, start_script
from guided_diffusion.image_datasets import script_data_share
from guided_diffusion.io_util import atomic_write_bytes, read_train_norm, save_npz_atomic
from guided_diffusion.plots import plot_calibration
from guided_diffusion.sample_util import build_diffusion, load_unet

FIT_FLAGS = ["exclude_steps", "b_range", "tol", "max_evals", "max_evals_linear", "train_norm_csv"]


def create_argparser() -> argparse.ArgumentParser:
    names = flags.MEASUREMENT_FLAGS + FIT_FLAGS + flags.MODEL_FLAGS + flags.DIFFUSION_FLAGS
    return flags.make_parser(__doc__, names, num_samples=128, batch_size=128)


def fit_ranges(args, steps: int):
    """(b_range, excluded steps) from ``--b_range LO,HI`` and ``--exclude_steps I,J``."""
    try:
        lo, hi = (float(v) for v in args.b_range.split(","))
    except ValueError:
        raise UserError(
            f"invalid --b_range {args.b_range!r}: expected LO,HI, e.g. 0.95,1.10"
        ) from None
    try:
        exclude = [int(v) for v in args.exclude_steps.split(",") if v.strip()]
    except ValueError:
        raise UserError(
            f"invalid --exclude_steps {args.exclude_steps!r}: expected step indices, e.g. 0,1"
        ) from None
    if not 0 < lo < hi:
        raise UserError(f"invalid --b_range {args.b_range!r}: need 0 < LO < HI")
    bad = [i for i in exclude if not 0 <= i < steps]
    if bad:
        raise UserError(f"--exclude_steps {bad} outside the step indices 0..{steps - 1}")
    return (lo, hi), exclude


def main() -> None:
    args = start_script(create_argparser(), "measure")
    device, world = dist_util.dev(), dist_util.get_world_size()
    if args.num_samples < 2:
        n = args.num_samples
        raise UserError(f"--num_samples must be at least 2 for the standard error of b, got {n}")
    diffusion = build_diffusion(args)  # bad respacing fails here, before loading
    K = diffusion.num_timesteps
    b_range, exclude = fit_ranges(args, K)
    csv = args.train_norm_csv
    train_norm = read_train_norm(csv, K, "--train_norm_csv") if csv else None
    share = script_data_share(args, None)
    logger.log(f"loading {args.model_path}")
    model = load_unet(args, device)
    idx, x0, kwargs = next(share)
    sampler = "ddim" if args.use_ddim else "ddpm"
    logger.log(
        f"calibrating on {args.num_samples} samples: {K} steps ({sampler}), b in {b_range}, "
        f"excluded steps {exclude}, {world} process(es) on {device}"
    )

    def report(ev: Evaluation) -> None:
        logger.log(
            f"pass {ev.phase:8s} k = {ev.k:+.6f} b = {ev.b:.6f}: mean gap {ev.gap:+.5f} "
            f"(s.e. {ev.gap_se:.5f}), rms {ev.rms_gap:.5f}, slope {ev.slope:+.5f}"
        )

    result = calibrate(
        model,
        diffusion,
        x0,
        seeds=eb.sample_seeds(args.seed, idx),
        model_kwargs=kwargs,
        sampler=sampler,
        clip_denoised=args.clip_denoised,
        exclude_steps=exclude,
        b_range=b_range,
        tol=args.tol,
        max_evals=args.max_evals,
        max_evals_linear=args.max_evals_linear,
        batch_size=args.batch_size,
        train_norm=train_norm,
        gather=lambda rows: dist_util.gather_rows(idx, {"r": rows})["r"],
        callback=report,
    )
    dist_util.on_rank0(write_outputs, args, result)
    dist_util.cleanup()


def write_outputs(args, result: CalibrationResult) -> None:
    """Rank 0: calibration.json / .npz / .png, and the flags to paste."""
    out = args.log_dir
    info = {**result.to_json(), "run_flags": dict(vars(args))}  # the fits first: unsorted
    atomic_write_bytes(json.dumps(info, indent=1).encode(), os.path.join(out, "calibration.json"))
    save_npz_atomic(os.path.join(out, "calibration.npz"), **result.curves())
    plot_calibration(os.path.join(out, "calibration.png"), result)
    logger.log(
        f"uniform: b = {result.uniform.b:.5f} (s.e. {result.uniform_b_se:.4f}, closed-loop "
        f"gain {result.uniform_gain:.3f}, {result.uniform_status}); linear: k = "
        f"{result.linear.k:.6f}, b = {result.linear.b:.5f} ({result.linear_status}); "
        f"mean gap at lambda = 1: {result.baseline.gap:+.5f}"
    )
    if result.uniform_status != "converged":
        logger.warn(f"the uniform fit did not converge ({result.uniform_status}): widen --b_range?")
    logger.log(f"wrote calibration.json, .npz and .png to {out}")
    print(result.flags("uniform"), flush=True)
    print(result.flags("linear"), flush=True)


if __name__ == "__main__":
    cli(main)
