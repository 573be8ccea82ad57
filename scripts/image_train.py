"""Train an ADM diffusion model on images (DDPM-IP with --input_perturbation).

    mpirun -n N python scripts/image_train.py --data_dir DATA.npz [model and diffusion flags] \
        --lr 1e-4 --batch_size 128 --input_perturbation 0.1 --log_dir runs/cifar

Checkpoints (modelNNNNNN.pt, ema_RATE_NNNNNN.pt, optNNNNNN.pt, stateNNNNNN.pt) and
flags.json go to --log_dir. Resume with --resume_checkpoint runs/cifar/modelNNNNNN.pt.
"""

import argparse

import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.image_datasets import load_data
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.sample_util import cli, default_log_dir
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.train_util import (
    TRAIN_FLAG_CHOICES,
    TRAIN_FLAG_HELP,
    TrainLoop,
    check_train_args,
    image_train_defaults,
    resume_step_of,
    save_flags,
)


def create_argparser() -> argparse.ArgumentParser:
    defaults = image_train_defaults()
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dict_to_argparser(parser, defaults, help=TRAIN_FLAG_HELP, choices=TRAIN_FLAG_CHOICES)
    return parser


def main() -> None:
    args = create_argparser().parse_args()
    dist_util.setup_dist()
    check_train_args(args)
    args.log_dir = dist_util.broadcast_object(args.log_dir or default_log_dir())
    logger.configure(dir=args.log_dir)
    save_flags(args)

    logger.log("creating model and diffusion...")
    torch.manual_seed(args.seed)
    model_flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    # fp32 weights: --use_fp16 converts the trunk after the fp32 master copy is made,
    # --use_bf16 trains with bfloat16 autocast.
    model_flags.update(use_fp16=False, use_bf16=False)
    model, diffusion = create_model_and_diffusion(**model_flags)
    model.to(dist_util.dev())
    schedule_sampler = create_named_schedule_sampler(
        args.schedule_sampler, diffusion, seed=args.seed
    )

    logger.log("creating data loader...")
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        seed=args.seed,
        num_workers=args.num_workers,
        start_batch=resume_step_of(args.resume_checkpoint),
        in_channels=args.in_channels,
        random_flip=args.random_flip,
    )

    logger.log("training...")
    TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        ema_rate=args.ema_rate,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        data_start_batch=resume_step_of(args.resume_checkpoint),
        use_fp16=args.use_fp16,
        fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=schedule_sampler,
        weight_decay=args.weight_decay,
        lr_anneal_steps=args.lr_anneal_steps,
        input_perturbation=args.input_perturbation,
        seed=args.seed,
        max_steps=args.max_steps,
        use_bf16=args.use_bf16,
        compile=args.compile,
        channels_last=args.channels_last,
        class_dropout_prob=args.class_dropout_prob,
    ).run_loop()
    logger.log("training done")
    dist_util.cleanup()


if __name__ == "__main__":
    cli(main)
