"""Activations per second of the evaluator's feature networks, and the 50k projection.

Runs ``Evaluator.compute_activations`` (uint8 NHWC batches -> device -> resize to 299 ->
Inception -> pool_3 and mixed_6/conv) with randomly initialised weights in the exact
layout of the ported FID Inception, on the CPU and, when present, the GPU::

    python benchmarks/eval_throughput.py                 # CPU (+ GPU), 32x32 and 64x64
    python benchmarks/eval_throughput.py --devices cuda --batch_size 256 --batches 20

The projection is for one 50k-image batch; a run that also computes the reference
batch's activations (no ``--ref_stats_cache``) takes about twice as long, plus the matrix
square roots of FID/sFID.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluations.evaluator import Evaluator  # noqa: E402
from evaluations.fmnist_net import FMNISTNet  # noqa: E402
from evaluations.inception import (  # noqa: E402
    InceptionV3FID,
    add_missing_num_batches_tracked,
    random_inception_state_dict,
)


def build_net(name: str) -> torch.nn.Module:
    """A feature net with random weights (``inception`` in the ported key layout)."""
    if name == "inception":
        net = InceptionV3FID()
        net.load_state_dict(add_missing_num_batches_tracked(random_inception_state_dict(), net))
        return net.to(memory_format=torch.channels_last).eval()
    return FMNISTNet().eval()


def measure(net_name: str, device: str, size: int, batch_size: int, batches: int) -> Dict:
    """Time ``batches`` batches after one warm-up batch; return a result row."""
    evaluator = Evaluator(build_net(net_name), batch_size=batch_size, device=device, progress=False)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    evaluator.compute_activations([batch])  # warm-up (allocations, cuDNN autotuning)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    evaluator.compute_activations([batch] * batches)  # returns numpy: synchronised
    seconds = time.perf_counter() - t0
    rate = batches * batch_size / seconds
    return {
        "net": net_name,
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "image_size": size,
        "batch_size": batch_size,
        "activations_per_s": round(rate, 2),
        "projected_50k_s": round(50_000 / rate, 1),
    }


def main() -> None:
    """Print one line per (net, device, size) and optionally write them as JSON."""
    default_devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--devices",
        nargs="+",
        default=default_devices,
        help="devices to time (default: cpu, plus cuda when available)",
    )
    p.add_argument(
        "--sizes",
        nargs="+",
        type=int,
        default=[32, 64],
        help="input image sizes (the Inception net resizes to 299)",
    )
    p.add_argument(
        "--nets",
        nargs="+",
        choices=("inception", "fmnist"),
        default=["inception"],
        help="feature networks to time",
    )
    p.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="images per batch (default: 16 on CPU, 200 on GPU)",
    )
    p.add_argument(
        "--batches", type=int, default=None, help="timed batches (default: 3 on CPU, 20 on GPU)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows: List[Dict] = []
    for net_name in args.nets:
        for device in args.devices:
            gpu = device.startswith("cuda")
            batch_size = args.batch_size or (200 if gpu else 16)
            batches = args.batches or (20 if gpu else 3)
            for size in args.sizes:
                row = measure(net_name, device, size, batch_size, batches)
                rows.append(row)
                print(
                    f"{net_name:9s} {row['device_name']:>24s} {size:4d}px batch {batch_size:4d}: "
                    f"{row['activations_per_s']:9.1f} activations/s, 50k in "
                    f"{row['projected_50k_s'] / 60:6.1f} min",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
