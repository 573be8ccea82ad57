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
import os

import numpy as np

from guided_diffusion import dist_util, flags, logger
from guided_diffusion import exposure_bias as eb
from guided_diffusion.cli import cli, progress_bar, start_script
from guided_diffusion.io_util import save_npz_atomic, write_csv, write_json_atomic
from guided_diffusion.plots import plot_eps_norm
from guided_diffusion.sample_util import build_diffusion, measurement_inputs

CSV_COLUMNS = ("step", "t", "train_norm", "sample_norm")


def create_argparser() -> argparse.ArgumentParser:
    names = flags.MEASUREMENT_FLAGS + flags.MODEL_FLAGS + flags.DIFFUSION_FLAGS
    return flags.make_parser(__doc__, names, num_samples=512, batch_size=64)


def main() -> None:
    args = start_script(create_argparser(), "measure")
    device, world = dist_util.dev(), dist_util.get_world_size()
    diffusion = build_diffusion(args)  # bad respacing or lambda fails here, before loading
    batches, model, sampler = measurement_inputs(args, device)
    logger.log(
        f"eps norms of {args.num_samples} samples: {diffusion.num_timesteps} steps ({sampler}), "
        f"lambda_i = {args.eps_scaler_k} * i + {args.eps_scaler}, {world} process(es) on {device}"
    )
    K = diffusion.num_timesteps
    index, train, raw = [np.zeros(0, dtype=np.int64)], [np.zeros((0, K))], [np.zeros((0, K))]
    bar = progress_bar(args.num_samples, "eps norms", enabled=args.progress)
    for idx, x0, kwargs in batches:
        seeds = eb.sample_seeds(args.seed, idx)
        train.append(eb.train_eps_norms(diffusion, model, x0, seeds, model_kwargs=kwargs))
        opts = dict(sampler=sampler, clip_denoised=args.clip_denoised, model_kwargs=kwargs)
        raw.append(eb.sampling_pass(diffusion, model, x0, seeds, **opts).eps_norm)
        index.append(idx)
        bar.update(min(len(idx) * world, bar.total - bar.n))
    bar.close()
    local = {"train": np.concatenate(train), "raw": np.concatenate(raw)}
    rows = dist_util.gather_rows(np.concatenate(index), local)
    dist_util.on_rank0(write_outputs, args, diffusion, rows["train"], rows["raw"])
    dist_util.cleanup()


def write_outputs(args, diffusion, train: np.ndarray, raw: np.ndarray) -> None:
    """Rank 0: the CSV, npz, plot and flags of the run (per-sample rows (N, K) by step i)."""
    lam = np.asarray(diffusion.eps_scale, dtype=np.float64)
    scaled = raw / lam
    rows = eb.file_rows(
        diffusion,
        dict(
            train_norm=train.mean(0),
            sample_norm=scaled.mean(0),
            sample_norm_raw=raw.mean(0),
            train_norm_std=train.std(0),
            sample_norm_std=scaled.std(0),
            train_norm_per_sample=train,
            sample_norm_per_sample=scaled,
            **{"lambda": lam},
        ),
    )
    out = args.log_dir
    write_csv(os.path.join(out, "eps_norm.csv"), {k: rows[k] for k in CSV_COLUMNS})
    save_npz_atomic(os.path.join(out, "eps_norm.npz"), **rows)
    plot = {"training": rows["train_norm"], "sampling (eps / lambda)": rows["sample_norm"]}
    if np.any(lam != 1.0):
        plot["sampling, raw eps"] = rows["sample_norm_raw"]
    sampler = "DDIM" if args.use_ddim else "DDPM"
    title = f"{len(train)} samples, {diffusion.num_timesteps} steps ({sampler}), "
    title += f"lambda_i = {args.eps_scaler_k:g} i + {args.eps_scaler:g}"
    plot_eps_norm(os.path.join(out, "eps_norm.png"), rows["t"], plot, title)
    write_json_atomic(os.path.join(out, "eps_norm_flags.json"), vars(args))
    gap = " ".join(f"{v:+.4f}" for v in eb.relative_gap(rows["sample_norm"], rows["train_norm"]))
    logger.log(f"relative gap sample/train - 1 per step (noisiest first): {gap}")
    logger.log(f"wrote eps_norm.csv, eps_norm.npz and eps_norm.png to {out}")


if __name__ == "__main__":
    cli(main)
