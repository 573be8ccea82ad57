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
import os

from guided_diffusion import dist_util, flags, logger
from guided_diffusion import exposure_bias as eb
from guided_diffusion.cli import UserError, cli, progress_bar, start_script
from guided_diffusion.io_util import save_npz_atomic, write_csv, write_json_atomic
from guided_diffusion.plots import plot_delta
from guided_diffusion.sample_util import build_diffusion, measurement_inputs

RUN_FLAGS = ["mode", "compare_eps_scaler", "compare_eps_scaler_k"]


def create_argparser() -> argparse.ArgumentParser:
    names = flags.MEASUREMENT_FLAGS + RUN_FLAGS + flags.MODEL_FLAGS + flags.DIFFUSION_FLAGS
    return flags.make_parser(__doc__, names, num_samples=512, batch_size=64)


def comparison(args, main):
    """The diffusion of --compare_eps_scaler B --compare_eps_scaler_k K (None: B = 0, off),
    its schedule checked here so that an error names these flags."""
    b, k, K = args.compare_eps_scaler, args.compare_eps_scaler_k, main.num_timesteps
    if b == 0 and k != 0:
        raise UserError("--compare_eps_scaler_k needs --compare_eps_scaler B > 0 (0 = off)")
    if b > 0 and b + k * (K - 1) <= 0:  # b > 0: lambda_i = k*i + b is smallest at i = K-1
        raise UserError(
            f"--compare_eps_scaler {b:g} --compare_eps_scaler_k {k:g} gives lambda_{K - 1} = "
            f"{b + k * (K - 1):g} at step {K - 1}; lambda_i = k*i + b must be positive at every "
            f"step: use --compare_eps_scaler_k > {-b / (K - 1):.4g} for this b"
        )
    return main.with_eps_scaler(b, k) if b > 0 else None


def main() -> None:
    args = start_script(create_argparser(), "measure")
    device, world = dist_util.dev(), dist_util.get_world_size()
    if args.num_samples < 2:
        raise UserError(
            f"--num_samples must be at least 2 for a standard deviation, got {args.num_samples}"
        )
    diffusion = build_diffusion(args)  # bad respacing or lambda fails here
    runs = {"main": diffusion, "compare": comparison(args, diffusion)}
    runs = {name: d for name, d in runs.items() if d is not None}
    batches, model, sampler = measurement_inputs(args, device)
    logger.log(
        f"delta_t ({args.mode}) of {args.num_samples} samples: {diffusion.num_timesteps} "
        f"steps ({sampler}), {world} process(es) on {device}"
    )
    moments = {name: (None, None) for name in runs}
    bar = progress_bar(args.num_samples, f"delta_t {args.mode}", enabled=args.progress)
    for idx, x0, kwargs in batches:
        seeds = eb.sample_seeds(args.seed, idx)
        opts = dict(sampler=sampler, clip_denoised=args.clip_denoised, model_kwargs=kwargs)
        for name, d in runs.items():
            if args.mode == "consecutive":
                run = eb.sampling_pass(d, model, x0, seeds, with_moments=True, **opts)
                rows, final = run.moments, run.final
            else:
                rows, final = eb.each_step_pass(d, model, x0, seeds, **opts)
            moments[name] = tuple(eb.merge_moments(m) for m in zip(moments[name], (rows, final)))
        bar.update(min(len(idx) * world, bar.total - bar.n))
    bar.close()
    gathered = dist_util.all_gather_object(moments)  # every rank's moments, in rank order
    dist_util.on_rank0(write_outputs, args, runs, gathered)
    dist_util.cleanup()


def write_outputs(args, runs: dict, gathered: list) -> None:
    """Rank 0: merge the ranks' moments into delta_t; CSVs, npz, plot and flags."""
    arrays, plotted = {}, {}
    for name, diffusion in runs.items():
        rows, final = (eb.merge_moments(g[name][j] for g in gathered) for j in (0, 1))
        curve = eb.delta_curve(rows, final, diffusion.alphas_cumprod)
        c = eb.file_rows(diffusion, {**curve, "lambda": diffusion.eps_scale})
        suffix, prefix = ("", "") if name == "main" else ("_compare", "compare_")
        csv = os.path.join(args.log_dir, f"exposure_bias{suffix}.csv")
        write_csv(csv, {k: c[k] for k in ("step", "t", "sigma_hat", "expected_sigma", "delta")})
        arrays.update({k: c[k] for k in ("step", "t", "expected_sigma")})
        arrays.update(
            {prefix + k: c[k] for k in ("sigma_hat", "delta", "final_sigma_hat", "lambda")}
        )
        label = f"lambda_i = {diffusion.eps_scaler_k:g} i + {diffusion.eps_scaler:g}"
        plotted[label] = c
        deltas = " ".join(f"{v:.4g}" for v in c["delta"])
        final = f"final sigma_hat {float(c['final_sigma_hat']):.4g}"
        logger.log(f"{label}: delta (noisiest first) {deltas}; {final}")
    sampler = "DDIM" if args.use_ddim else "DDPM"
    K = runs["main"].num_timesteps
    title = f"delta_t ({args.mode}), {args.num_samples} samples, {K} steps ({sampler})"
    png = os.path.join(args.log_dir, "exposure_bias.png")
    plot_delta(png, arrays["t"], arrays["expected_sigma"], plotted, title)
    save_npz_atomic(os.path.join(args.log_dir, "exposure_bias.npz"), **arrays)
    write_json_atomic(os.path.join(args.log_dir, "exposure_bias_flags.json"), vars(args))
    logger.log(f"wrote exposure_bias.csv, .npz and .png to {args.log_dir}")


if __name__ == "__main__":
    cli(main)
