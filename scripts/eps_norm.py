"""Epsilon L2-norm per sampling step: the training curve against the sampling curve.

    mpirun -n N python scripts/eps_norm.py --model_path MODEL.pt [model flags] \
        --timestep_respacing 20 --data_dir train.npz --num_samples 512 \
        [--eps_scaler B --eps_scaler_k K] --log_dir OUT

For each of the first --num_samples data images x_0 and each sampling step i (row i: the
state fed to step i, at original timestep t_i; rows from the noisiest step to the last):

* ``train_norm``  = mean over samples of ||eps_theta(x_t, t_i)||_2 with x_t ~ q(x_t | x_0);
* ``sample_norm`` = mean over samples of ||eps_theta(x̂_t, t_i) / lambda_i||_2 along
  consecutive sampling from x̂ = q_sample(x_0, t_{K-1}) with the given Epsilon Scaling
  lambda_i = k * i + b (Ning et al., ICLR 2024, "Epsilon L2-norm"); the raw norm before the
  division is in the npz as ``sample_norm_raw``.

Norms are Frobenius norms over C x H x W. Outputs in --log_dir: ``eps_norm.csv``
(``step,t,train_norm,sample_norm``), ``eps_norm.npz`` (these curves, ``lambda``,
``sample_norm_raw``, their standard deviations over samples and the per-sample norms
``*_per_sample`` (N, K), all in file row order), ``eps_norm.png`` and the flags as JSON.
Sample j draws its noise from generators seeded by (--seed, j): the result does not depend
on the number of processes.
"""

import argparse
import json
import os

import numpy as np

from guided_diffusion import dist_util, logger
from guided_diffusion import exposure_bias as eb
from guided_diffusion.sample_util import build_diffusion, cli, load_unet
from guided_diffusion.script_util import add_dict_to_argparser, model_and_diffusion_defaults


def create_argparser() -> argparse.ArgumentParser:
    defaults = eb.measurement_defaults(num_samples=512, batch_size=64)
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dict_to_argparser(parser, defaults, help=eb.measurement_help())
    return parser


def main() -> None:
    args = eb.start_script(create_argparser())
    device = dist_util.dev()
    world = dist_util.get_world_size()
    diffusion = build_diffusion(args)  # bad respacing or lambda fails here, before loading
    batches = eb.script_data_share(args, batch_size=args.batch_size)
    logger.log(f"loading {args.model_path}")
    model = load_unet(args, device)
    K = diffusion.num_timesteps
    sampler = "ddim" if args.use_ddim else "ddpm"
    logger.log(
        f"eps norms of {args.num_samples} samples: {K} steps ({sampler}), lambda_i = "
        f"{args.eps_scaler_k} * i + {args.eps_scaler}, {world} process(es) on {device}"
    )

    indices, train, raw = [np.zeros(0, dtype=np.int64)], [np.zeros((0, K))], [np.zeros((0, K))]
    bar = eb.progress_bar(args.num_samples, args.progress, "eps norms")
    for idx, x0, kwargs in batches:
        seeds = eb.sample_seeds(args.seed, idx)
        train.append(eb.train_eps_norms(diffusion, model, x0, seeds, model_kwargs=kwargs))
        run = eb.sampling_pass(
            diffusion,
            model,
            x0,
            seeds,
            sampler=sampler,
            clip_denoised=args.clip_denoised,
            model_kwargs=kwargs,
        )
        raw.append(run.eps_norm)
        indices.append(idx)
        if bar is not None:
            bar.update(min(len(idx) * world, bar.total - bar.n))
    if bar is not None:
        bar.close()
    rows = eb.gather_rows(
        np.concatenate(indices),
        {"train": np.concatenate(train), "raw": np.concatenate(raw)},
        dist_util.all_gather_object,
    )
    dist_util.on_rank0(write_outputs, args, diffusion, rows["train"], rows["raw"])
    dist_util.cleanup()


def write_outputs(args, diffusion, train: np.ndarray, raw: np.ndarray) -> None:
    """Rank 0: the CSV, npz, plot and flags of the run (arrays indexed by step i on input)."""
    lam = np.asarray(diffusion.eps_scale, dtype=np.float64)
    scaled = raw / lam
    t = eb.original_timesteps(diffusion)
    order = np.arange(diffusion.num_timesteps)[::-1]  # file rows: noisiest step first
    curves = {
        "step": order,
        "t": t[order],
        "train_norm": train.mean(0)[order],
        "sample_norm": scaled.mean(0)[order],
    }
    eb.write_csv(os.path.join(args.log_dir, "eps_norm.csv"), curves)
    np.savez(
        os.path.join(args.log_dir, "eps_norm.npz"),
        **curves,
        sample_norm_raw=raw.mean(0)[order],
        train_norm_std=train.std(0)[order],
        sample_norm_std=scaled.std(0)[order],
        train_norm_per_sample=train[:, order],
        sample_norm_per_sample=scaled[:, order],
        **{"lambda": lam[order]},
    )
    sampler = "DDIM" if args.use_ddim else "DDPM"
    plot = {"training": curves["train_norm"], "sampling (eps / lambda)": curves["sample_norm"]}
    if np.any(lam != 1.0):
        plot["sampling, raw eps"] = raw.mean(0)[order]
    eb.plot_eps_norm(
        os.path.join(args.log_dir, "eps_norm.png"),
        curves["t"],
        plot,
        f"{len(train)} samples, {diffusion.num_timesteps} steps ({sampler}), "
        f"lambda_i = {args.eps_scaler_k:g} i + {args.eps_scaler:g}",
    )
    with open(os.path.join(args.log_dir, "eps_norm_flags.json"), "w") as f:
        json.dump(vars(args), f, indent=1, sort_keys=True)
    g = eb.relative_gap(curves["sample_norm"], curves["train_norm"])
    logger.log(
        "relative gap sample/train - 1 per step (noisiest first): "
        + " ".join(f"{v:+.4f}" for v in g)
    )
    logger.log(f"wrote eps_norm.csv, eps_norm.npz and eps_norm.png to {args.log_dir}")


if __name__ == "__main__":
    cli(main)
