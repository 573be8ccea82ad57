"""Sampling throughput of the ADM UNet: plain fp32 eager versus the fast path.

Builds an official configuration (random weights; the flags come from the recorded layouts
of the official checkpoints) or a small one, and times one UNet pass and one full sampling
step (p_sample with Epsilon Scaling) after warm-up, with CUDA events on a GPU and
perf_counter on a CPU. Prints ms per pass, images/s at 100 steps, effective TFLOP/s
(FLOPs counted by torch.utils.flop_counter) and the relative error of each path against the
plain fp32 path on the same inputs.

    python benchmarks/sample_throughput.py --config imagenet64_cond --paths plain,fast
    python benchmarks/sample_throughput.py --config tiny32 --device cpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from guided_diffusion.script_util import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.unet import set_attention_impl

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ROOT / "tests" / "fixtures" / "adm_checkpoint_layouts.json"
README_BATCH = {
    "cifar10_uncond_32": 512,
    "lsun_tower_64": 256,
    "ffhq_128": 128,
    "imagenet64_cond": 256,
    "imagenet128_cond": 100,
}
SMALL = {
    # the demo model's architecture, and a ~11M-parameter 32x32 model like the training anchor
    "tiny32": dict(
        image_size=32,
        num_channels=32,
        num_res_blocks=2,
        channel_mult="1,2,2",
        attention_resolutions="16",
        num_head_channels=32,
    ),
    "small32": dict(
        image_size=32,
        num_channels=64,
        num_res_blocks=2,
        channel_mult="1,2,2,2",
        attention_resolutions="16",
        num_head_channels=64,
    ),
}
PATHS = {
    # name: (attention, half dtype or None, channels_last, compile mode or None)
    "plain": ("einsum", None, False, None),
    "default": ("sdpa", None, True, None),
    "bf16": ("sdpa", torch.bfloat16, True, None),
    "fp16": ("sdpa", torch.float16, True, None),
    "fast": ("sdpa", torch.bfloat16, True, "max-autotune-no-cudagraphs"),
    "fast-graphs": ("sdpa", torch.bfloat16, True, "reduce-overhead"),
}


def config_flags(name: str) -> dict:
    flags = model_and_diffusion_defaults()
    if name in SMALL:
        flags.update(
            learn_sigma=True,
            noise_schedule="cosine",
            resblock_updown=True,
            use_new_attention_order=True,
            **SMALL[name],
        )
    else:
        configs = {c["name"]: c for c in json.loads(LAYOUTS.read_text())["configs"]}
        flags.update({k: v for k, v in configs[name]["flags"].items() if k != "eps_scaler"})
    flags.update(timestep_respacing="100", eps_scaler=1.006)
    return flags


def timer(device: torch.device):
    """A function that runs ``fn`` ``n`` times and returns the mean seconds per call."""

    def run(fn, n: int) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000 / n
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--config", default="tiny32", help=f"one of {sorted(README_BATCH) + sorted(SMALL)}"
    )
    p.add_argument("--batch_size", type=int, default=0, help="0: the README batch size (CPU: 16)")
    p.add_argument("--paths", default="plain,default,fast", help=f"comma list of {list(PATHS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=10, help="timed iterations after warm-up")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.config not in {**README_BATCH, **SMALL}:
        p.error(
            f"unknown --config {args.config!r}; choose from {sorted(README_BATCH) + sorted(SMALL)}"
        )
    flags = config_flags(args.config)
    batch = args.batch_size or (README_BATCH.get(args.config, 64) if device.type == "cuda" else 16)

    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**flags)
    for prm in model.parameters():  # random weights everywhere (the output convs start at 0)
        with torch.no_grad():
            prm.normal_(0, 0.02) if prm.ndim > 1 else prm.normal_(0, 0.01)
    model.eval().to(device)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, flags["image_size"], flags["image_size"], device=device, generator=g)
    t = torch.full((batch,), 50, device=device, dtype=torch.long)
    kwargs = {}
    if flags["class_cond"]:
        kwargs["y"] = torch.randint(0, flags["num_classes"], (batch,), device=device, generator=g)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(
            x[:1],
            diffusion.timestep_map[50] * torch.ones(1, dtype=torch.long, device=device),
            **{k: v[:1] for k, v in kwargs.items()},
        )
    gflop = fc.get_total_flops() / 1e9
    n_params = sum(q.numel() for q in model.parameters()) / 1e6
    print(
        f"{args.config}: {n_params:.1f}M params, {gflop:.1f} GFLOP/img, batch {batch}, "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
        f"torch {torch.__version__}"
    )
    run = timer(device)
    names = args.paths.split(",")
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        p.error(f"unknown --paths {unknown}; choose from {list(PATHS)}")
    # the reference of the relative errors: the plain fp32 eager path on the same inputs
    reference = measure(
        "plain",
        flags,
        state,
        diffusion,
        x,
        t,
        kwargs,
        g,
        lambda f, n: 0.0,
        argparse.Namespace(warmup=0, iters=0),
    )[0]
    for name in names:
        if PATHS[name][1] is not None and device.type != "cuda":
            print(f"{name:12s} skipped (half precision needs a GPU)")
            continue
        out, pass_s, step_s = measure(name, flags, state, diffusion, x, t, kwargs, g, run, args)
        rel = float((out - reference).norm() / reference.norm())
        print(
            f"{name:12s} {pass_s * 1e3:8.1f} ms/pass  {step_s * 1e3:8.1f} ms/step  "
            f"{batch / (step_s * 100):8.2f} img/s@100  "
            f"{gflop * batch / pass_s / 1e3:7.2f} TFLOP/s  rel.err {rel:.2e}"
        )


def measure(name, flags, state, diffusion, x, t, kwargs, g, run, args):
    """Build the model for one path; return (output, seconds per pass, seconds per step)."""
    attn, half, channels_last, compile_mode = PATHS[name]
    device = x.device
    m, _ = create_model_and_diffusion(**flags)
    m.load_state_dict(state)
    m.eval().to(device)
    set_attention_impl(m, attn)
    if half is not None:
        m.convert_to_fp16(half)
    if channels_last:  # as optimize_for_sampling does, on every device
        m = m.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    fn = torch.compile(m, mode=compile_mode) if compile_mode else m
    t_model = torch.full_like(t, diffusion.timestep_map[int(t[0])])
    with torch.inference_mode():
        for _ in range(args.warmup):
            fn(x, t_model, **kwargs)
            diffusion.p_sample(fn, x, t, model_kwargs=kwargs, generator=g)
        pass_s = run(lambda: fn(x, t_model, **kwargs), args.iters)
        step_s = run(
            lambda: diffusion.p_sample(fn, x, t, model_kwargs=kwargs, generator=g), args.iters
        )
        out = fn(x, t_model, **kwargs).float()
    return out, pass_s, step_s


if __name__ == "__main__":
    main()
