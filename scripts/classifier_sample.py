"""Sample with classifier guidance (Dhariwal & Nichol 2021) and Epsilon Scaling.

    mpirun -n N python scripts/classifier_sample.py --model_path MODEL.pt \
        --classifier_path CLASSIFIER.pt --classifier_scale 0.5 [model and classifier flags]

The classifier gradient shifts the DDPM mean (or, with --use_ddim, the DDIM score); the
eps scaler is applied exactly once in both cases.
"""

import argparse

import torch
import torch.nn.functional as F

from guided_diffusion import dist_util, logger
from guided_diffusion.checkpoints import load_checkpoint_into, read_state_dict
from guided_diffusion.sample_util import (
    SAMPLING_CHOICES,
    SAMPLING_HELP,
    UserError,
    build_diffusion,
    cli,
    generate_batch,
    load_unet,
    optimize_for_sampling,
    run_sampling,
    sampling_defaults,
    start_sampling_script,
)
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    classifier_defaults,
    create_classifier,
    model_and_diffusion_defaults,
)


def create_argparser() -> argparse.ArgumentParser:
    defaults = sampling_defaults()
    defaults.update(classifier_path="", classifier_scale=1.0)
    defaults.update(model_and_diffusion_defaults())
    defaults.update(classifier_defaults())
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dict_to_argparser(
        parser,
        defaults,
        choices=SAMPLING_CHOICES,
        help=dict(
            SAMPLING_HELP,
            use_ddim="DDIM sampling (guidance on the score) instead of DDPM (guidance on the mean)",
            model_path="diffusion model checkpoint (.pt state dict)",
            classifier_path="noisy-image classifier checkpoint (.pt state dict)",
            classifier_scale="guidance scale s: the gradient of s * log p(y | x_t) is used",
        ),
    )
    return parser


def load_classifier(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """Build the classifier of the flags and load ``--classifier_path`` into it (strict)."""
    if not args.classifier_path:
        raise UserError("--classifier_path is required for classifier guidance")
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
    if not parser.parse_args().model_path:
        raise UserError("--model_path is required for classifier guidance")
    args = start_sampling_script(parser)
    device = dist_util.dev()

    diffusion = build_diffusion(args)
    logger.log(f"loading {args.model_path} and {args.classifier_path}")
    classifier = load_classifier(args, device)
    model = optimize_for_sampling(load_unet(args, device), args, device)
    scale = float(args.classifier_scale)

    def cond_fn(x, t, y=None):
        """grad_x log p(y | x_t) * classifier_scale."""
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[torch.arange(len(log_probs), device=x.device), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    def model_fn(x, t, y=None):
        return model(x, t, y if args.class_cond else None)

    def sample_batch(n: int, generator: torch.Generator):
        return generate_batch(
            model_fn,
            diffusion,
            n,
            generator,
            image_size=args.image_size,
            device=device,
            use_ddim=args.use_ddim,
            clip_denoised=args.clip_denoised,
            num_classes=args.num_classes,
            cond_fn=cond_fn,
        )

    run_sampling(
        sample_batch,
        flags=vars(args),
        log_dir=args.log_dir,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        image_size=args.image_size,
        seed=args.seed,
        device=device,
        progress=args.progress,
    )
    dist_util.cleanup()


if __name__ == "__main__":
    cli(main)
