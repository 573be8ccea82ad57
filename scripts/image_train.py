"""Train an ADM diffusion model on images (DDPM-IP with --input_perturbation).

    mpirun -n N python scripts/image_train.py --data_dir DATA.npz [model and diffusion flags] \
        --lr 1e-4 --batch_size 128 --input_perturbation 0.1 --log_dir runs/cifar

Checkpoints (modelNNNNNN.pt, ema_RATE_NNNNNN.pt, optNNNNNN.pt, stateNNNNNN.pt), flags.json
and the logs go to --log_dir. Rerunning the same command resumes from the latest checkpoint
there (also after a SIGTERM, which saves one); a folder holding a run with other flags is
refused. --resume_checkpoint DIR/modelNNNNNN.pt continues a run with new flags.
"""

import argparse

import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.cli import cli, start_script
from guided_diffusion.flags import (
    DIFFUSION_FLAGS,
    GROUP_DEFAULTS,
    MODEL_FLAGS,
    TRAIN_FLAGS,
    make_parser,
)
from guided_diffusion.script_util import args_to_dict, create_model_and_diffusion
from guided_diffusion.train_util import TrainLoop, prepare_run, run_training, training_data


def create_argparser() -> argparse.ArgumentParser:
    names = TRAIN_FLAGS + MODEL_FLAGS + DIFFUSION_FLAGS
    return make_parser(__doc__, names, **GROUP_DEFAULTS["train"])


def main() -> None:
    args = start_script(create_argparser(), "train")
    args.resume_checkpoint = prepare_run(args)

    logger.log("creating model and diffusion...")
    torch.manual_seed(args.seed)
    # fp32 weights: --use_fp16 converts the trunk after the fp32 master copy is made,
    # --use_bf16 trains with bfloat16 autocast.
    flags = args_to_dict(args, MODEL_FLAGS + DIFFUSION_FLAGS)
    model, diffusion = create_model_and_diffusion(**{**flags, "use_fp16": False, "use_bf16": False})
    model.to(dist_util.dev())

    logger.log("creating data loader...")
    data = training_data(args, args.image_size)
    run_training(TrainLoop.from_args(args, model, diffusion, data), args)


if __name__ == "__main__":
    cli(main)
