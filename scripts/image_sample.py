"""Sample images from an ADM model, with Epsilon Scaling, into an .npz batch for the evaluator.

    mpirun -n N python scripts/image_sample.py --model_path MODEL.pt [model flags] \
        --timestep_respacing 100 --eps_scaler 1.017 --num_samples 50000 --batch_size 512

Without --model_path it samples from the bundled Fashion-MNIST model. Rerunning the same
command with the same --log_dir after a crash resumes where it stopped.
"""

import argparse

import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.sample_util import (
    SAMPLING_CHOICES,
    SAMPLING_HELP,
    build_diffusion,
    cli,
    generate_batch,
    load_unet,
    optimize_for_sampling,
    run_sampling,
    sampling_defaults,
    start_sampling_script,
)
from guided_diffusion.script_util import add_dict_to_argparser, model_and_diffusion_defaults


def create_argparser() -> argparse.ArgumentParser:
    defaults = sampling_defaults()
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dict_to_argparser(parser, defaults, help=SAMPLING_HELP, choices=SAMPLING_CHOICES)
    return parser


def main() -> None:
    args = start_sampling_script(create_argparser())
    device = dist_util.dev()

    diffusion = build_diffusion(args)  # bad respacing or lambda fails here, before loading
    logger.log(f"loading {args.model_path}")
    model = optimize_for_sampling(load_unet(args, device), args, device)
    logger.log(
        f"sampling {args.num_samples} images: {diffusion.num_timesteps} steps "
        f"({'DDIM' if args.use_ddim else 'DDPM'}), lambda_i = {args.eps_scaler_k} * i + "
        f"{args.eps_scaler}, {dist_util.get_world_size()} process(es) on {device}"
    )

    def sample_batch(n: int, generator: torch.Generator):
        return generate_batch(
            model,
            diffusion,
            n,
            generator,
            image_size=args.image_size,
            device=device,
            use_ddim=args.use_ddim,
            clip_denoised=args.clip_denoised,
            num_classes=args.num_classes if args.class_cond else None,
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
