"""Package a trained checkpoint for shipping: fp16 weights plus the model flags as JSON.

    python scripts/export_model.py --checkpoint logs/run/ema_0.999_010000.pt \
        --flags logs/run/flags.json --out models/adm_fmnist32

writes ``models/adm_fmnist32_ema.pt`` (the state dict in float16: half the size; sampling
loads it into a float32 model) and ``models/adm_fmnist32.json`` (the model and diffusion
flags, sampling defaults, and where the weights came from). This is how the bundled
Fashion-MNIST model was made.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch

from guided_diffusion.checkpoints import load_checkpoint_into, read_state_dict
from guided_diffusion.sample_util import cli
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="model or EMA checkpoint (.pt)")
    p.add_argument("--flags", required=True, help="flags.json written by image_train.py")
    p.add_argument("--out", required=True, help="output prefix, e.g. models/adm_fmnist32")
    p.add_argument("--timestep_respacing", default="20", help="default sampling steps")
    p.add_argument("--description", default="", help="one line about the model")
    p.add_argument("--extra_json", default="", help="a JSON file merged into the metadata")
    args = p.parse_args()

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
    out_pt.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_pt.with_suffix(".tmp")
    torch.save(half, tmp)
    os.replace(tmp, out_pt)
    meta = {
        "description": args.description,
        "flags": flags,
        "sampling_defaults": {"timestep_respacing": args.timestep_respacing},
        "source_checkpoint": os.path.basename(args.checkpoint),
        "num_params": sum(v.numel() for v in half.values()),
        "weights_sha256": hashlib.sha256(out_pt.read_bytes()).hexdigest(),
        "training_flags": {k: v for k, v in train_flags.items() if k not in flags},
    }
    if args.extra_json:
        meta.update(json.loads(Path(args.extra_json).read_text()))
    Path(f"{args.out}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out_pt} ({out_pt.stat().st_size / 1e6:.1f} MB) and {args.out}.json")


if __name__ == "__main__":
    cli(main)
