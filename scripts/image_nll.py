"""Bits per dimension of a dataset under an ADM model (the variational bound, calc_bpd_loop).

    mpirun -n N python scripts/image_nll.py --model_path MODEL.pt --data_dir DATA \
        [model and diffusion flags] --num_samples 1000 --batch_size 16

Prints and logs the bits/dim; writes the mean per-step terms (vb, mse, xstart_mse; noisiest
step first) as {name}_terms.npz to --log_dir. Costs one model pass per diffusion step.
"""

import argparse
from pathlib import Path

from guided_diffusion import dist_util, logger
from guided_diffusion.image_datasets import load_data
from guided_diffusion.sample_util import (
    UserError,
    build_diffusion,
    cli,
    default_log_dir,
    load_unet,
    resolve_precision,
    save_npz_atomic,
)
from guided_diffusion.script_util import add_dict_to_argparser, model_and_diffusion_defaults
from guided_diffusion.train_util import run_bpd_evaluation


def create_argparser() -> argparse.ArgumentParser:
    defaults = dict(
        data_dir="",
        clip_denoised=True,
        num_samples=1000,
        batch_size=1,
        model_path="",
        seed=0,
        log_dir="",
    )
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dict_to_argparser(
        parser,
        defaults,
        help=dict(
            data_dir="images to evaluate: an image folder or an .npz (arr_0 uint8 NHWC)",
            clip_denoised="clip each x_0 prediction to [-1, 1]",
            num_samples="evaluate at least this many images (whole batches over all ranks)",
            batch_size="images per batch on each process",
            model_path="model or EMA checkpoint (.pt state dict)",
            seed="seed of the noise drawn at each diffusion step",
            log_dir="output folder (default: $OPENAI_LOGDIR, else a timestamped temp folder)",
        ),
    )
    return parser


def main() -> None:
    args = create_argparser().parse_args()
    dist_util.setup_dist()
    device = dist_util.dev()
    for name in ("num_samples", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    if not args.model_path:
        raise UserError("--model_path is required")
    if not args.data_dir:
        raise UserError("--data_dir is required (an image folder or an .npz file)")
    resolve_precision(args, device)
    args.log_dir = dist_util.broadcast_object(args.log_dir or default_log_dir())
    logger.configure(dir=args.log_dir)

    diffusion = build_diffusion(args)
    logger.log(f"loading {args.model_path}...")
    model = load_unet(args, device)
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        deterministic=True,
        random_flip=False,
        seed=args.seed,
        num_workers=0,
    )
    logger.log("evaluating...")
    out = run_bpd_evaluation(
        model, diffusion, data, args.num_samples, clip_denoised=args.clip_denoised, seed=args.seed
    )
    logger.log(f"bits/dim: {float(out['bpd']):.6f}")
    logger.logkv("bits_per_dim", float(out["bpd"]))
    logger.dumpkvs()
    if dist_util.get_rank() == 0:
        for name in ("vb", "mse", "xstart_mse"):
            save_npz_atomic(Path(args.log_dir) / f"{name}_terms.npz", arr_0=out[name])
    logger.log("evaluation complete")
    dist_util.cleanup()


if __name__ == "__main__":
    cli(main)
