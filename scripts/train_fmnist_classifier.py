"""Train the offline feature network of ``evaluator.py --feature_net fmnist``.

Reads the npz files written by ``datasets/fashion_mnist.py --out_dir DIR`` (``arr_0`` uint8
[N, 32, 32, 3], ``arr_1`` int64 labels), trains :class:`evaluations.fmnist_net.FMNISTNet`
on the training split on the CPU, and writes its state dict plus a JSON card (test
accuracy, command, time, hardware) next to it::

    python datasets/fashion_mnist.py --out_dir data/fmnist
    python scripts/train_fmnist_classifier.py --train_npz data/fmnist/fmnist_train.npz \\
        --test_npz data/fmnist/fmnist_test.npz --out models/fmnist_classifier.pt

SGD with Nesterov momentum and a one-cycle learning rate; augmentation: random horizontal
flips and shifts of up to 2 pixels. Deterministic for a given ``--seed`` and thread count.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluations.fmnist_net import FEATURE_DIM, SPATIAL_DIM, FMNISTNet  # noqa: E402
from guided_diffusion.cli import UserError, cli  # noqa: E402
from guided_diffusion.flags import make_parser  # noqa: E402


def load_npz(path: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, 3, 32, 32], labels int64 [N])`` from a dataset npz."""
    with np.load(path, allow_pickle=False) as z:
        images, labels = z["arr_0"], z["arr_1"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise SystemExit(f"error: {path}: arr_0 must be uint8 [N, 32, 32, 3], got {images.shape}")
    if labels.shape != (len(images),):
        raise SystemExit(f"error: {path}: arr_1 must hold one label per image")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to ``max_shift`` pixels per image
    (zero fill), on a uint8 batch [N, C, H, W]."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (torch.arange(h)[None] + dy[:, None])[:, None, :, None]  # (N, 1, H, 1)
    cols = (torch.arange(w)[None] + dx[:, None])[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n)[:, None, None, None]
    chans = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, chans, rows, cols]


@torch.no_grad()
def evaluate(model: FMNISTNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on uint8 images [N, 3, 32, 32]."""
    model.eval()
    correct = 0
    for start in range(0, len(images), 1000):
        logits = model.classify(images[start : start + 1000].float())
        correct += int((logits.argmax(1) == labels[start : start + 1000]).sum())
    return correct / len(images)


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

    train_x, train_y = load_npz(args.train_npz)
    test_x, test_y = load_npz(args.test_npz)
    model = FMNISTNet()
    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay
    )
    steps_per_epoch = len(train_x) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.25
    )
    t0 = time.time()
    history = []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=gen)
        total_loss = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            x = augment(train_x[idx], gen).float()
            loss = F.cross_entropy(model.classify(x), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item()
        acc = evaluate(model, test_x, test_y)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": total_loss / steps_per_epoch,
                "test_accuracy": acc,
                "seconds": round(time.time() - t0, 1),
            }
        )
        print(json.dumps(history[-1]), flush=True)
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
