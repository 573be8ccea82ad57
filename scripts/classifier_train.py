"""Train a noisy-image classifier for classifier guidance.

    mpirun -n N python scripts/classifier_train.py --data_dir TRAIN_DIR --val_data_dir VAL_DIR \
        --iterations 300000 --anneal_lr True --batch_size 256 --lr 3e-4 --weight_decay 0.05 \
        [classifier and diffusion flags]

Labels come from the file-name prefixes (or arr_1 of an .npz). modelNNNNNN.pt and
optNNNNNN.pt go to --log_dir; the model loads into classifier_sample.py --classifier_path
with the same classifier flags. Rerunning the same command resumes from the latest
checkpoint there (also after a SIGTERM, which saves one).
"""

import argparse

import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.cli import cli, start_script
from guided_diffusion.flags import (
    CLASSIFIER_FLAGS,
    CLASSIFIER_TRAIN_FLAGS,
    DIFFUSION_FLAGS,
    GROUP_DEFAULTS,
    make_parser,
)
from guided_diffusion.image_datasets import load_data
from guided_diffusion.script_util import args_to_dict, create_classifier_and_diffusion
from guided_diffusion.train_util import (
    ClassifierTrainLoop,
    prepare_run,
    run_training,
    training_data,
)


def create_argparser() -> argparse.ArgumentParser:
    names = CLASSIFIER_TRAIN_FLAGS + CLASSIFIER_FLAGS + DIFFUSION_FLAGS + ["num_classes"]
    return make_parser(__doc__, names, **GROUP_DEFAULTS["classifier_train"])


def main() -> None:
    args = start_script(create_argparser(), "train")
    args.resume_checkpoint = prepare_run(args)

    logger.log("creating model and diffusion...")
    torch.manual_seed(args.seed)
    flags = args_to_dict(args, CLASSIFIER_FLAGS + DIFFUSION_FLAGS + ["num_classes"])
    flags["classifier_use_fp16"] = False  # fp32 master weights; the trainer converts the trunk
    model, diffusion = create_classifier_and_diffusion(**flags)
    model.to(dist_util.dev())

    logger.log("creating data loader...")
    data = training_data(args, args.image_size, class_cond=True, random_crop=True)
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
    run_training(ClassifierTrainLoop.from_args(args, model, diffusion, data, val_data), args)


if __name__ == "__main__":
    cli(main)
