"""Upsample low-resolution images with a super-resolution ADM model.

    mpirun -n N python scripts/super_res_sample.py --model_path SR_MODEL.pt \
        --base_samples samples_10000x64x64x3.npz --large_size 256 --small_size 64 \
        [model and diffusion flags] --num_samples 10000 --batch_size 16

--base_samples is an .npz with arr_0 uint8 [N, small, small, 3] (and arr_1 labels for
class-conditional models), e.g. the output of image_sample.py; they are used in order and
cycled when num_samples exceeds N. Writes samples_{num}x{large}x{large}x3.npz to --log_dir.
"""

import argparse
from pathlib import Path

from guided_diffusion import dist_util, logger
from guided_diffusion.sample_util import (
    UserError,
    check_sampling_args,
    cli,
    default_log_dir,
    output_name,
    resolve_precision,
    save_npz_atomic,
)
from guided_diffusion.script_util import add_dict_to_argparser, sr_model_and_diffusion_defaults
from guided_diffusion.train_util import load_sr_model, read_base_samples, super_resolve


def create_argparser() -> argparse.ArgumentParser:
    defaults = dict(
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        use_ddim=False,
        base_samples="",
        model_path="",
        seed=0,
        log_dir="",
    )
    defaults.update(sr_model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dict_to_argparser(
        parser,
        defaults,
        help=dict(
            clip_denoised="clip each x_0 prediction to [-1, 1]",
            num_samples="number of images to upsample",
            batch_size="images per batch on each process",
            use_ddim="DDIM sampling (deterministic, eta 0) instead of ancestral DDPM",
            base_samples=".npz of low-resolution images: arr_0 uint8 [N, small, small, 3], "
            "arr_1 labels for class-conditional models",
            model_path="super-resolution model or EMA checkpoint (.pt state dict)",
            seed="base seed; batch j draws its noise from a generator seeded by (seed, j)",
            log_dir="output folder (default: $OPENAI_LOGDIR, else a timestamped temp folder)",
        ),
    )
    return parser


def main() -> None:
    args = create_argparser().parse_args()
    dist_util.setup_dist()
    device = dist_util.dev()
    check_sampling_args(args)
    if not args.model_path:
        raise UserError("--model_path is required (a super-resolution checkpoint)")
    if not args.base_samples:
        raise UserError("--base_samples is required (an .npz of low-resolution images)")
    resolve_precision(args, device)
    args.log_dir = dist_util.broadcast_object(args.log_dir or default_log_dir())
    logger.configure(dir=args.log_dir)

    images, labels = read_base_samples(args.base_samples, args.small_size, args.class_cond)
    logger.log(f"loading {args.model_path}...")
    model, diffusion = load_sr_model(args, device)
    logger.log(f"upsampling {args.num_samples} images to {args.large_size}x{args.large_size}...")
    arr = super_resolve(
        model,
        diffusion,
        images,
        labels,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        large_size=args.large_size,
        clip_denoised=args.clip_denoised,
        use_ddim=args.use_ddim,
        seed=args.seed,
    )
    if dist_util.get_rank() == 0:
        out_path = Path(args.log_dir) / f"{output_name(args.num_samples, args.large_size)}.npz"
        save_npz_atomic(out_path, arr_0=arr)
        logger.log(f"saved {len(arr)} samples to {out_path}")
    dist_util.cleanup()


if __name__ == "__main__":
    cli(main)
