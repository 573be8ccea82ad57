"""Sample images from an ADM model, with Epsilon Scaling, into an .npz batch for the evaluator.

    mpirun -n N python scripts/image_sample.py --model_path MODEL.pt [model flags] \
        --timestep_respacing 100 --eps_scaler 1.017 --num_samples 50000 --batch_size 512

Without --model_path it samples from the bundled Fashion-MNIST model. Rerunning the same
command with the same --log_dir after a crash resumes where it stopped. Samplers
(--sampler ddpm/ddim/dpmpp2m, --ddim_eta), time-shift sampling (--time_shift) and
classifier-free guidance (--guidance_scale) combine with --eps_scaler/--eps_scaler_k.
"""

import argparse

from guided_diffusion import dist_util, logger
from guided_diffusion.cli import cli, start_script
from guided_diffusion.flags import DIFFUSION_FLAGS, MODEL_FLAGS, SAMPLING_FLAGS, make_parser
from guided_diffusion.sample_util import (
    SamplingOptions,
    build_diffusion,
    load_sampling_model,
    sample_from_args,
)


def create_argparser() -> argparse.ArgumentParser:
    return make_parser(__doc__, SAMPLING_FLAGS + MODEL_FLAGS + DIFFUSION_FLAGS)


def main() -> None:
    args = start_script(create_argparser(), "sample")
    device = dist_util.dev()
    diffusion = build_diffusion(args)  # bad respacing or lambda fails here, before loading
    options = SamplingOptions.from_args(args)
    logger.log(f"loading {args.model_path}")
    model = load_sampling_model(args, device)
    logger.log(
        f"sampling {args.num_samples} images: {diffusion.num_timesteps} steps "
        f"({options.describe()}), lambda_i = {args.eps_scaler_k} * i + {args.eps_scaler}, "
        f"{dist_util.get_world_size()} process(es) on {device}"
    )

    sample_from_args(model, diffusion, args, device)
    dist_util.cleanup()


if __name__ == "__main__":
    cli(main)
