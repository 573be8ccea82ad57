"""Train the offline feature network of ``evaluator.py --feature_net fmnist``.

Reads the npz files written by ``datasets/fashion_mnist.py --out_dir DIR`` (``arr_0`` uint8
[N, 32, 32, 3], ``arr_1`` int64 labels), trains :class:`evaluations.fmnist_net.FMNISTNet`
on the training split on the CPU, and writes its state dict plus a JSON card (test
accuracy, command, time, hardware) next to it::

    python datasets/fashion_mnist.py --out_dir data/fmnist
    python scripts/train_fmnist_classifier.py --train_npz data/fmnist/fmnist_train.npz \\
        --test_npz data/fmnist/fmnist_test.npz --out models/fmnist_classifier.pt

The training itself (SGD with Nesterov momentum, one-cycle learning rate, flips and shifts
of up to 2 pixels) is ``evaluations.fmnist_train``. Deterministic for a given ``--seed`` and
thread count.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluations.fmnist_net import FEATURE_DIM, SPATIAL_DIM  # noqa: E402
from evaluations.fmnist_train import load_npz, train_fmnist_net  # noqa: E402
from guided_diffusion.cli import UserError, cli  # noqa: E402
from guided_diffusion.flags import make_parser  # noqa: E402


def create_argparser() -> argparse.ArgumentParser:
    """Flags of the training script (the table's, with this script's defaults)."""
    names = "train_npz test_npz out epochs batch_size lr weight_decay seed threads".split()
    help = dict(lr="peak learning rate (one-cycle SGD)", weight_decay="SGD weight decay")
    return make_parser(
        __doc__,
        names,
        help=help,
        out="models/fmnist_classifier.pt",
        batch_size=128,
        lr=0.1,
        weight_decay=5e-4,
        threads=2,
    )


def main() -> None:
    """Train, report test accuracy after every epoch, save weights and the JSON card."""
    args = create_argparser().parse_args()
    if not (args.train_npz and args.test_npz):
        raise UserError("--train_npz and --test_npz are required")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)

    train = load_npz(args.train_npz)
    test_x, test_y = load_npz(args.test_npz)
    t0 = time.time()
    model, history = train_fmnist_net(
        train,
        (test_x, test_y),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        gen=gen,
        on_epoch=lambda record: print(json.dumps(record), flush=True),
    )
    seconds = time.time() - t0

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    card = {
        "model": "evaluations.fmnist_net.FMNISTNet",
        "test_accuracy": history[-1]["test_accuracy"],
        "test_images": len(test_x),
        "feature_dim": FEATURE_DIM,
        "spatial_dim": SPATIAL_DIM,
        "parameters": sum(p.numel() for p in model.parameters()),
        "training_command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "training_seconds": round(seconds, 1),
        "hardware": f"CPU ({platform.processor() or platform.machine()}), "
        f"{args.threads} torch threads",
        "torch": torch.__version__,
        "history": history,
        "note": "FID/IS from this net are NOT comparable with Inception-based numbers.",
    }
    out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"test accuracy {card['test_accuracy']:.4f}; wrote {out} in {seconds:.0f} s")


if __name__ == "__main__":
    cli(main)
