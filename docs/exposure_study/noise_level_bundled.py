"""Issue 22, item 1 (first measurement): the effective noise level of the DDPM sampler's inputs on
the bundled model, 10 steps, 256 samples, lambda 0.98 / 1.0 / 1.011, 95% paired bootstrap
intervals. Run from the repository root: python docs/exposure_study/noise_level_bundled.py
(needs data/fmnist: python datasets/fashion_mnist.py --out_dir data/fmnist --no_png).
Output of 2026-12-06 (2-core CPU, bf16 trunk, 121 s): noise_level_bundled.txt. Arrays are
by step index i = 0..9 (t_i = 0, 111, ..., 999)."""

import time
from pathlib import Path

import numpy as np
import torch

from guided_diffusion import exposure_study as es
from guided_diffusion import noise_level as nl
from guided_diffusion.cli import bundled_model_args
from guided_diffusion.diffusion_schedule import get_named_beta_schedule
from guided_diffusion.fast_path import cpu_supports_fast_bf16
from guided_diffusion.sample_util import build_diffusion, load_sampling_model

t0 = time.time()
dev = torch.device("cpu")
m = bundled_model_args("", timestep_respacing="10", use_bf16=cpu_supports_fast_bf16())
model = load_sampling_model(m, dev)
base = build_diffusion(m)
full = np.cumprod(1 - get_named_beta_schedule("cosine", 1000))
with np.load("data/fmnist/fmnist_train.npz") as z:
    imgs = z["arr_0"][:4000]
x0 = torch.from_numpy(imgs[..., 0:1]).permute(0, 3, 1, 2).float() / 127.5 - 1
data_rows = nl.state_stats(x0).numpy()
runs = {}
for lam in (0.98, 1.0, 1.011):
    r = es.run_pass(
        Path(f"runs/noise_bundled/{lam:g}"),
        model,
        base.with_eps_scaler(lam),
        num_samples=256,
        batch_size=128,
        seed=0,
        shape=(1, 32, 32),
        device=dev,
        num_classes=10,
    )
    runs[f"{lam:g}"] = r["states"]
out = nl.curve_intervals(
    runs, data_rows, base.alphas_cumprod, full, baseline="1", num_boot=300, seed=0
)
np.set_printoptions(precision=3, linewidth=220)
print("t_i", es.__name__, [int(t) for t in base.timestep_map])
for k, v in out.items():
    for q in ("sigma_ratio", "noise_ratio", "signal_ratio", "diff_1"):
        print(k, q, "value", v[q]["value"])
        print(k, q, "low  ", v[q]["low"])
        print(k, q, "high ", v[q]["high"])
print("seconds", time.time() - t0)
