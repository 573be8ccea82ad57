"""Train a super-resolution ADM model: small_size images upsampled to large_size.

    mpirun -n N python scripts/super_res_train.py --data_dir DATA --large_size 256 \
        --small_size 64 [model and diffusion flags] --batch_size 4 --log_dir runs/sr

The low-resolution input is the training image area-downsampled to small_size. Checkpoints
are those of image_train.py and load into super_res_sample.py with the same flags.
Rerunning the same command resumes from the latest checkpoint in --log_dir.
"""

import argparse

import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.cli import UserError, cli, start_script
from guided_diffusion.flags import GROUP_DEFAULTS, make_parser
from guided_diffusion.script_util import (
    args_to_dict,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)
from guided_diffusion.train_util import (
    TrainLoop,
    image_train_defaults,
    prepare_run,
    run_training,
    superres_batches,
    training_data,
)


def create_argparser() -> argparse.ArgumentParser:
    names = list(image_train_defaults()) + list(sr_model_and_diffusion_defaults())
    return make_parser(__doc__, names, **GROUP_DEFAULTS["train"])


def main() -> None:
    args = start_script(create_argparser(), "train")
    if args.small_size > args.large_size:
        raise UserError(f"--small_size {args.small_size} exceeds --large_size {args.large_size}")
    args.resume_checkpoint = prepare_run(args)

    logger.log("creating model...")
    torch.manual_seed(args.seed)
    # fp32 weights: --use_fp16 converts the trunk after the fp32 master copy is made,
    # --use_bf16 trains with bfloat16 autocast.
    flags = args_to_dict(args, sr_model_and_diffusion_defaults())
    model, diffusion = sr_create_model_and_diffusion(
        **{**flags, "use_fp16": False, "use_bf16": False}
    )
    model.to(dist_util.dev())

    logger.log("creating data loader...")
    data = training_data(args, args.large_size)
    loop = TrainLoop.from_args(args, model, diffusion, superres_batches(data, args.small_size))
    run_training(loop, args)


if __name__ == "__main__":
    cli(main)
