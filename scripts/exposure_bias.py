"""Exposure bias delta_t per sampling step (Ning et al., ICLR 2024, "Metric delta_t").

    mpirun -n N python scripts/exposure_bias.py --model_path MODEL.pt [model flags] \
        --timestep_respacing 20 --data_dir train.npz --num_samples 512 \
        --mode consecutive [--compare_eps_scaler 1.017] --log_dir OUT

For the first --num_samples data images x_0: sigma_hat_t = the per-pixel standard deviation
over the samples of x̂_t - sqrt(abar_t) x_0 (unbiased variance), averaged over C x H x W, and
delta_t = (sigma_hat_t - sqrt(1 - abar_t))^2. Row i (``step`` i, ``t`` its original
timestep; rows from the noisiest step to the last) describes the state fed to step i:

* ``--mode consecutive``: x_0 is forward-diffused to the first step (row K-1, exact by
  construction: the statistical noise floor) and sampled; row i < K-1 is the output of
  step i + 1.
* ``--mode each_step``: row i < K-1 is the output of ONE reverse step (step i + 1) from a
  true x_{t_{i+1}} = q_sample(x_0, t_{i+1}); row K-1 is the true forward sample.

The spread of the last output x̂_0 - x_0 (expected 0; not a row) is in the npz as
``final_sigma_hat``. The run uses --eps_scaler/--eps_scaler_k (default 1.0: plain ADM);
--compare_eps_scaler B [--compare_eps_scaler_k K] repeats it with that lambda on the same
noise. Outputs in --log_dir: ``exposure_bias.csv`` (``step,t,sigma_hat,expected_sigma,
delta``), ``exposure_bias_compare.csv`` (the same for the comparison), ``exposure_bias.npz``
(every curve, ``compare_*`` for the comparison, ``lambda``), ``exposure_bias.png`` and the
flags as JSON.
"""

import argparse
import json
import os

import numpy as np

from guided_diffusion import dist_util, logger
from guided_diffusion import exposure_bias as eb
from guided_diffusion.sample_util import build_diffusion, cli, load_unet
from guided_diffusion.script_util import add_dict_to_argparser, model_and_diffusion_defaults

MODES = ("consecutive", "each_step")


def create_argparser() -> argparse.ArgumentParser:
    defaults = eb.measurement_defaults(num_samples=512, batch_size=64)
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dict_to_argparser(parser, defaults, help=eb.measurement_help())
    parser.add_argument(
        "--mode",
        default="consecutive",
        choices=MODES,
        help="consecutive sampling from q(x_T | x_0), or one reverse step from a true x_t "
        "at each step (default: 'consecutive')",
    )
    parser.add_argument(
        "--compare_eps_scaler",
        type=float,
        default=None,
        help="also measure with Epsilon Scaling b = this (same samples and noise) and plot "
        "both (default: off)",
    )
    parser.add_argument(
        "--compare_eps_scaler_k",
        type=float,
        default=0.0,
        help="k of the comparison schedule lambda_i = k*i + b (default: 0.0)",
    )
    return parser


def main() -> None:
    args = eb.start_script(create_argparser())
    device = dist_util.dev()
    world = dist_util.get_world_size()
    if args.num_samples < 2:
        raise ValueError(
            f"--num_samples must be at least 2 for a standard deviation, got {args.num_samples}"
        )
    runs = {"main": build_diffusion(args)}  # bad respacing or lambda fails here
    if args.compare_eps_scaler is not None:
        runs["compare"] = runs["main"].with_eps_scaler(
            args.compare_eps_scaler, args.compare_eps_scaler_k
        )
    batches = eb.script_data_share(args, batch_size=args.batch_size)
    logger.log(f"loading {args.model_path}")
    model = load_unet(args, device)
    sampler = "ddim" if args.use_ddim else "ddpm"
    K = runs["main"].num_timesteps
    logger.log(
        f"delta_t ({args.mode}) of {args.num_samples} samples: {K} steps ({sampler}), "
        f"{world} process(es) on {device}"
    )

    moments = {name: (None, None) for name in runs}
    bar = eb.progress_bar(args.num_samples, args.progress, f"delta_t {args.mode}")
    for idx, x0, kwargs in batches:
        seeds = eb.sample_seeds(args.seed, idx)
        for name, diffusion in runs.items():
            opts = dict(sampler=sampler, clip_denoised=args.clip_denoised, model_kwargs=kwargs)
            if args.mode == "consecutive":
                run = eb.sampling_pass(diffusion, model, x0, seeds, with_moments=True, **opts)
                rows, final = run.moments, run.final
            else:
                rows, final = eb.each_step_pass(diffusion, model, x0, seeds, **opts)
            old_rows, old_final = moments[name]
            moments[name] = (
                eb.merge_moments([old_rows, rows]),
                eb.merge_moments([old_final, final]),
            )
        if bar is not None:
            bar.update(min(len(idx) * world, bar.total - bar.n))
    if bar is not None:
        bar.close()
    gathered = dist_util.all_gather_object(moments)  # every rank's moments, in rank order

    def finish() -> None:
        curves = {}
        for name, diffusion in runs.items():
            rows = eb.merge_moments(g[name][0] for g in gathered)
            final = eb.merge_moments(g[name][1] for g in gathered)
            curves[name] = eb.delta_curve(rows, final, diffusion.alphas_cumprod)
        write_outputs(args, runs, curves)

    dist_util.on_rank0(finish)
    dist_util.cleanup()


def _label(diffusion) -> str:
    return f"lambda_i = {diffusion.eps_scaler_k:g} i + {diffusion.eps_scaler:g}"


def write_outputs(args, runs: dict, curves: dict) -> None:
    """Rank 0: CSVs, npz, plot and flags (curves indexed by step i on input)."""
    main = runs["main"]
    K = main.num_timesteps
    order = np.arange(K)[::-1]  # file rows: noisiest step first
    t = eb.original_timesteps(main)[order]
    arrays = {"step": order, "t": t}
    for name, c in curves.items():
        table = {
            "step": order,
            "t": t,
            "sigma_hat": c["sigma_hat"][order],
            "expected_sigma": c["expected_sigma"][order],
            "delta": c["delta"][order],
        }
        suffix = "" if name == "main" else "_compare"
        eb.write_csv(os.path.join(args.log_dir, f"exposure_bias{suffix}.csv"), table)
        prefix = "" if name == "main" else "compare_"
        arrays[f"{prefix}sigma_hat"] = table["sigma_hat"]
        arrays[f"{prefix}delta"] = table["delta"]
        arrays[f"{prefix}final_sigma_hat"] = c["final_sigma_hat"]
        arrays[f"{prefix}lambda"] = np.asarray(runs[name].eps_scale)[order]
        logger.log(
            f"{_label(runs[name])}: delta (noisiest first) "
            + " ".join(f"{v:.4g}" for v in table["delta"])
            + f"; final sigma_hat {float(c['final_sigma_hat']):.4g}"
        )
    arrays["expected_sigma"] = curves["main"]["expected_sigma"][order]
    np.savez(os.path.join(args.log_dir, "exposure_bias.npz"), **arrays)
    sampler = "DDIM" if args.use_ddim else "DDPM"
    eb.plot_delta(
        os.path.join(args.log_dir, "exposure_bias.png"),
        t,
        arrays["expected_sigma"],
        {
            _label(runs[name]): {k: c[k][order] for k in ("sigma_hat", "delta")}
            for name, c in curves.items()
        },
        f"delta_t ({args.mode}), {args.num_samples} samples, {K} steps ({sampler})",
    )
    with open(os.path.join(args.log_dir, "exposure_bias_flags.json"), "w") as f:
        json.dump(vars(args), f, indent=1, sort_keys=True)
    logger.log(f"wrote exposure_bias.csv, .npz and .png to {args.log_dir}")


if __name__ == "__main__":
    cli(main)
