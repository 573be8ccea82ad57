"""Train a noisy-image classifier for classifier guidance.

    mpirun -n N python scripts/classifier_train.py --data_dir TRAIN_DIR --val_data_dir VAL_DIR \
        --iterations 300000 --anneal_lr True --batch_size 256 --lr 3e-4 --weight_decay 0.05 \
        [classifier and diffusion flags]

Labels come from the file-name prefixes (or arr_1 of an .npz). modelNNNNNN.pt and
optNNNNNN.pt go to --log_dir; the model loads into classifier_sample.py --classifier_path
with the same classifier flags.
"""

import argparse

import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.image_datasets import load_data
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.sample_util import cli, default_log_dir
from guided_diffusion.script_util import (
    NUM_CLASSES,
    add_dict_to_argparser,
    args_to_dict,
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
)
from guided_diffusion.train_util import (
    TRAIN_FLAG_CHOICES,
    TRAIN_FLAG_HELP,
    ClassifierTrainLoop,
    check_train_args,
    classifier_train_defaults,
    resume_step_of,
    save_flags,
)


def create_argparser() -> argparse.ArgumentParser:
    defaults = classifier_train_defaults()
    defaults.update(classifier_and_diffusion_defaults())
    defaults["num_classes"] = NUM_CLASSES
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
    flags = args_to_dict(args, classifier_and_diffusion_defaults().keys())
    flags["classifier_use_fp16"] = False  # fp32 master weights; the trainer converts the trunk
    model, diffusion = create_classifier_and_diffusion(**flags, num_classes=args.num_classes)
    model.to(dist_util.dev())
    schedule_sampler = None
    if args.noised:
        schedule_sampler = create_named_schedule_sampler(
            args.schedule_sampler, diffusion, seed=args.seed
        )

    logger.log("creating data loader...")
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=True,
        random_crop=True,
        seed=args.seed,
        num_workers=args.num_workers,
        start_batch=resume_step_of(args.resume_checkpoint),
    )
    val_data = None
    if args.val_data_dir:
        val_data = load_data(
            data_dir=args.val_data_dir,
            batch_size=args.batch_size,
            image_size=args.image_size,
            class_cond=True,
            seed=args.seed,
            num_workers=args.num_workers,
        )

    logger.log("training classifier model...")
    ClassifierTrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        val_data=val_data,
        noised=args.noised,
        iterations=args.iterations,
        lr=args.lr,
        weight_decay=args.weight_decay,
        anneal_lr=args.anneal_lr,
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        schedule_sampler=schedule_sampler,
        resume_checkpoint=args.resume_checkpoint,
        data_start_batch=resume_step_of(args.resume_checkpoint),
        log_interval=args.log_interval,
        eval_interval=args.eval_interval,
        save_interval=args.save_interval,
        use_fp16=args.classifier_use_fp16,
        seed=args.seed,
    ).run_loop()
    logger.log("training done")
    dist_util.cleanup()


if __name__ == "__main__":
    cli(main)
