"""Package a trained checkpoint for shipping: fp16 weights plus the model flags as JSON.

    python scripts/export_model.py --checkpoint logs/run/ema_0.9999_010000.pt \
        --flags logs/run/flags.json --out models/adm_fmnist32

writes ``models/adm_fmnist32_ema.pt`` (the state dict in float16: half the size; sampling
loads it into a float32 model) and ``models/adm_fmnist32.json`` (the model and diffusion
flags, sampling defaults, and where the weights came from). This is how the bundled
Fashion-MNIST model was made.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from guided_diffusion.checkpoints import load_checkpoint_into, read_state_dict
from guided_diffusion.cli import UserError, cli
from guided_diffusion.flags import make_parser
from guided_diffusion.io_util import atomic_save, file_sha256, write_json_atomic
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

HELP = dict(timestep_respacing="default sampling steps of the exported model")


def create_argparser() -> argparse.ArgumentParser:
    names = "checkpoint flags out timestep_respacing description extra_json".split()
    return make_parser(__doc__, names, help=HELP, timestep_respacing="20")


def main() -> None:
    args = create_argparser().parse_args()
    if not (args.checkpoint and args.flags and args.out):
        raise UserError("--checkpoint, --flags and --out are required")
    train_flags = json.loads(Path(args.flags).read_text())
    flags = {k: train_flags[k] for k in model_and_diffusion_defaults() if k in train_flags}
    flags.update(
        use_fp16=False, use_bf16=False, timestep_respacing="", eps_scaler=1.0, eps_scaler_k=0.0
    )
    state = read_state_dict(args.checkpoint)
    model, _ = create_model_and_diffusion(**flags)
    load_checkpoint_into(model, state, flags, args.checkpoint)  # the flags must fit
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    out_pt = Path(f"{args.out}_ema.pt")
    atomic_save(half, out_pt)
    meta = {
        "description": args.description,
        "flags": flags,
        "sampling_defaults": {"timestep_respacing": args.timestep_respacing},
        "source_checkpoint": os.path.basename(args.checkpoint),
        "num_params": sum(v.numel() for v in half.values()),
        "weights_sha256": file_sha256(out_pt),
        "training_flags": {k: v for k, v in train_flags.items() if k not in flags},
    }
    if args.extra_json:
        meta.update(json.loads(Path(args.extra_json).read_text()))
    write_json_atomic(f"{args.out}.json", meta)
    print(f"wrote {out_pt} ({out_pt.stat().st_size / 1e6:.1f} MB) and {args.out}.json")


if __name__ == "__main__":
    cli(main)
