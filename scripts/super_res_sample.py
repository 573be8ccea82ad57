"""Upsample low-resolution images with a super-resolution ADM model.

    mpirun -n N python scripts/super_res_sample.py --model_path SR_MODEL.pt \
        --base_samples samples_10000x64x64x3.npz --large_size 256 --small_size 64 \
        [model and diffusion flags] --num_samples 10000 --batch_size 16

--base_samples is an .npz with arr_0 uint8 [N, small, small, 3] (and arr_1 labels for
class-conditional models), e.g. the output of image_sample.py: global batch j upsamples
images j*batch_size ... (cycled when num_samples exceeds N) with noise seeded by
(--seed, j). Writes samples_{num}x{large}x{large}x3.npz (arr_1: the labels used, for
class-conditional models) to --log_dir; rerunning the same command resumes.
"""

import argparse

import numpy as np
import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.checkpoints import load_checkpoint_into, read_state_dict
from guided_diffusion.cli import UserError, cli, start_script
from guided_diffusion.flags import SAMPLING_FLAGS, make_parser
from guided_diffusion.image_datasets import read_npz
from guided_diffusion.sample_util import (
    SamplingOptions,
    generate_batch,
    optimize_for_sampling,
    run_sampling,
)
from guided_diffusion.script_util import (
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)

REQUIRED = {
    "model_path": "a super-resolution checkpoint; there is no bundled one",
    "base_samples": "an .npz of low-resolution images",
}


def create_argparser() -> argparse.ArgumentParser:
    names = [n for n in SAMPLING_FLAGS if n != "guidance_scale"] + ["base_samples"]
    return make_parser(__doc__, names + list(sr_model_and_diffusion_defaults()))


def read_base_samples(path: str, small_size: int, class_cond: bool):
    """(uint8 [N, small, small, 3], int64 labels or None); one-line errors for a missing or
    malformed file, a wrong size, or missing labels of a class-conditional model."""
    images, labels = read_npz(path)
    if images.shape[1:3] != (small_size, small_size):
        raise UserError(
            f"{path}: images are {images.shape[1]}x{images.shape[2]}, but --small_size is "
            f"{small_size}"
        )
    if class_cond and labels is None:
        raise UserError(f"{path}: a class-conditional model needs labels (arr_1)")
    return images, (labels if class_cond else None)


def load_sr_model(args: argparse.Namespace, device: torch.device):
    """The super-resolution model of the flags with --model_path loaded (strict), on
    ``device``, in eval mode and the precision of --use_fp16/--use_bf16; and its diffusion."""
    flags = {k: getattr(args, k) for k in sr_model_and_diffusion_defaults()}
    model, diffusion = sr_create_model_and_diffusion(
        **{**flags, "use_fp16": False, "use_bf16": False}
    )
    load_checkpoint_into(model, read_state_dict(args.model_path), path=args.model_path)
    model.to(device)
    if args.use_fp16:
        model.convert_to_fp16()
    elif args.use_bf16:
        model.convert_to_fp16(torch.bfloat16)
    return model.eval(), diffusion


def main() -> None:
    parser = create_argparser()
    given = parser.parse_known_args()[0]
    for flag, what in REQUIRED.items():
        if not getattr(given, flag):
            raise UserError(f"--{flag} is required ({what})")
    args = start_script(parser, "sample")
    device = dist_util.dev()
    images, labels = read_base_samples(args.base_samples, args.small_size, args.class_cond)
    logger.log(f"loading {args.model_path}...")
    model, diffusion = load_sr_model(args, device)
    fast = optimize_for_sampling(model, args, device)
    options = SamplingOptions.from_args(args)
    size = args.large_size
    logger.log(f"upsampling {args.num_samples} images to {size}x{size} ({options.describe()})...")

    def sample_batch(j: int, n: int, generator: torch.Generator):
        idx = (j * args.batch_size + np.arange(n)) % len(images)
        low_res = torch.from_numpy(images[idx]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        model_kwargs = {"low_res": low_res[:, : args.in_channels]}  # (n, C, small, small)
        if labels is not None:
            model_kwargs["y"] = torch.from_numpy(labels[idx]).to(device)
        out, _ = generate_batch(
            fast,
            diffusion,
            n,
            generator,
            shape=(args.in_channels, size, size),
            device=device,
            options=options,
            model_kwargs=model_kwargs,
        )
        return out, None if labels is None else labels[idx]

    run_sampling(
        sample_batch,
        flags={**vars(args), "image_size": size},
        log_dir=args.log_dir,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        image_size=size,
        seed=args.seed,
        device=device,
        progress=args.progress,
    )
    dist_util.cleanup()


if __name__ == "__main__":
    cli(main)
