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

import numpy as np
import torch

from guided_diffusion import dist_util, logger
from guided_diffusion import exposure_bias as eb
from guided_diffusion.sample_util import build_diffusion, cli, load_unet
from guided_diffusion.script_util import add_dict_to_argparser, model_and_diffusion_defaults


def create_argparser() -> argparse.ArgumentParser:
    defaults = eb.measurement_defaults(num_samples=128, batch_size=128)
    defaults.update(
        exclude_steps="0",
        b_range="0.95,1.10",
        tol=1e-4,
        max_evals=8,
        max_evals_linear=5,
        train_norm_csv="",
    )
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dict_to_argparser(
        parser,
        defaults,
        help=dict(
            eb.measurement_help(),
            exclude_steps="comma-separated step indices i left out of the objective "
            "(0 = the last step; empty: none)",
            b_range="LO,HI: the range searched for b (and for lambda at both ends of the "
            "linear schedule)",
            tol="stop when the next change of b (or of lambda, linear fit) is below this",
            max_evals="most sampling passes for the uniform fit, the lambda = 1 pass included",
            max_evals_linear="most sampling passes for the linear fit",
            train_norm_csv="target curve: the train_norm column of an eps_norm.csv (same "
            "respacing) instead of this model's own training curve",
        ),
    )
    return parser


def main() -> None:
    args = eb.start_script(create_argparser())
    b_range = eb.parse_float_pair(args.b_range, "b_range")
    exclude = eb.parse_steps(args.exclude_steps, "exclude_steps")
    if args.tol <= 0 or args.max_evals < 2 or args.max_evals_linear < 1:
        raise ValueError("need --tol > 0, --max_evals >= 2 and --max_evals_linear >= 1")
    device = dist_util.dev()
    world = dist_util.get_world_size()
    build_diffusion(args)  # bad respacing fails here, before loading
    factory = eb.factory_from_args(args)
    K = factory(1.0, 0.0).num_timesteps
    bad = [i for i in exclude if not 0 <= i < K]
    if bad:
        raise ValueError(f"--exclude_steps {bad} outside the step indices 0..{K - 1}")
    batches = eb.script_data_share(args, batch_size=args.num_samples)
    logger.log(f"loading {args.model_path}")
    model = load_unet(args, device)
    idx, x0, kwargs = next(batches, (np.zeros(0, dtype=np.int64), None, {}))
    if x0 is None:  # more processes than samples: this one has none
        x0 = torch.zeros((0, 3, args.image_size, args.image_size), device=device)
    sampler = "ddim" if args.use_ddim else "ddpm"
    logger.log(
        f"calibrating on {args.num_samples} samples: {K} steps ({sampler}), b in {b_range}, "
        f"excluded steps {exclude}, {world} process(es) on {device}"
    )

    def gather(rows: np.ndarray) -> np.ndarray:
        return eb.gather_rows(idx, {"r": rows}, dist_util.all_gather_object)["r"]

    def report(ev: eb.Evaluation) -> None:
        logger.log(
            f"pass {ev.phase:8s} k = {ev.k:+.6f} b = {ev.b:.6f}: mean gap {ev.gap:+.5f} "
            f"(s.e. {ev.gap_se:.5f}), rms {ev.rms_gap:.5f}, slope {ev.slope:+.5f}"
        )

    train_norm = None
    if args.train_norm_csv:
        table = eb.read_csv(args.train_norm_csv)
        if "train_norm" not in table or len(table["train_norm"]) != K:
            raise ValueError(
                f"--train_norm_csv {args.train_norm_csv} needs a train_norm column with {K} rows "
                "(an eps_norm.csv of the same respacing)"
            )
        order = np.argsort(table["step"])  # rows run from the noisiest step; index by i
        train_norm = np.asarray(table["train_norm"], dtype=np.float64)[order]
    result = eb.calibrate(
        model,
        factory,
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
        gather=gather,
        callback=report,
        train_norm=train_norm,
    )
    dist_util.on_rank0(write_outputs, args, result)
    dist_util.cleanup()


def write_outputs(args, result: eb.CalibrationResult) -> None:
    """Rank 0: calibration.json / .npz / .png, and the flags to paste."""
    info = result.to_json()
    info["run_flags"] = dict(vars(args))
    with open(os.path.join(args.log_dir, "calibration.json"), "w") as f:
        json.dump(info, f, indent=1)
    np.savez(os.path.join(args.log_dir, "calibration.npz"), **result.curves())
    eb.plot_calibration(os.path.join(args.log_dir, "calibration.png"), result)
    logger.log(
        f"uniform: b = {result.uniform.b:.5f} (s.e. {result.uniform_b_se:.4f}, closed-loop "
        f"gain {result.uniform_gain:.3f}, {result.uniform_status}); linear: k = "
        f"{result.linear.k:.6f}, b = {result.linear.b:.5f} ({result.linear_status}); "
        f"mean gap at lambda = 1: {result.baseline.gap:+.5f}"
    )
    if result.uniform_status != "converged":
        logger.warn(f"the uniform fit did not converge ({result.uniform_status}): widen --b_range?")
    logger.log(f"wrote calibration.json, .npz and .png to {args.log_dir}")
    print(result.flags("uniform"), flush=True)
    print(result.flags("linear"), flush=True)


if __name__ == "__main__":
    cli(main)
