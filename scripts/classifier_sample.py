"""Sample with classifier guidance (Dhariwal & Nichol 2021) and Epsilon Scaling.

    mpirun -n N python scripts/classifier_sample.py --model_path MODEL.pt \
        --classifier_path CLASSIFIER.pt --classifier_scale 0.5 [model and classifier flags]

The classifier gradient shifts the DDPM mean (or, with --use_ddim, the DDIM score); the
eps scaler is applied exactly once in both cases.
"""

import argparse

import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.checkpoints import load_checkpoint_into, read_state_dict
from guided_diffusion.cli import UserError, cli, start_script
from guided_diffusion.flags import (
    CLASSIFIER_FLAGS,
    DIFFUSION_FLAGS,
    MODEL_FLAGS,
    SAMPLING_FLAGS,
    make_parser,
)
from guided_diffusion.guidance import classifier_cond_fn
from guided_diffusion.sample_util import (
    SamplingOptions,
    build_diffusion,
    load_sampling_model,
    sample_from_args,
)
from guided_diffusion.script_util import args_to_dict, classifier_defaults, create_classifier

HELP = dict(
    use_ddim="DDIM sampling (guidance on the score) instead of DDPM (guidance on the mean)",
    model_path="diffusion model checkpoint (.pt state dict)",
)


def create_argparser() -> argparse.ArgumentParser:
    names = SAMPLING_FLAGS + ["classifier_path", "classifier_scale"] + MODEL_FLAGS
    names += DIFFUSION_FLAGS + [n for n in CLASSIFIER_FLAGS if n != "image_size"]
    return make_parser(__doc__, names, help=HELP)


def load_classifier(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """Build the classifier of the flags and load ``--classifier_path`` into it (strict)."""
    state = read_state_dict(args.classifier_path)
    flags = args_to_dict(args, classifier_defaults().keys())
    with torch.device("meta"):
        classifier = create_classifier(**flags, num_classes=args.num_classes)
    flags["num_classes"] = args.num_classes
    state = {k: v.float() for k, v in state.items()}
    load_checkpoint_into(
        classifier, state, flags, args.classifier_path, kind="classifier", assign=True
    )
    classifier.to(device)
    if args.classifier_use_fp16:
        classifier.convert_to_fp16()
    return classifier.eval()


def main() -> None:
    parser = create_argparser()
    given = parser.parse_args()
    if not given.model_path:
        raise UserError("--model_path is required for classifier guidance")
    if not given.classifier_path:
        raise UserError("--classifier_path is required for classifier guidance")
    args = start_script(parser, "sample")
    device = dist_util.dev()
    diffusion = build_diffusion(args)
    SamplingOptions.from_args(args)  # a --use_ddim/--sampler conflict fails here
    cond_fn = classifier_cond_fn(load_classifier(args, device), args.classifier_scale)
    logger.log(f"loading {args.model_path} and {args.classifier_path}")
    model = load_sampling_model(args, device)

    def model_fn(x, t, y=None):
        return model(x, t, y=y if args.class_cond else None)

    sample_from_args(model_fn, diffusion, args, device, cond_fn=cond_fn, draw_labels=True)
    dist_util.cleanup()


if __name__ == "__main__":
    cli(main)
