"""Training throughput of ADM: the plain fp32 eager step versus the fast paths.

Builds a model from a small config (random weights, learned sigma, cosine schedule) and
times full ``TrainLoop.run_step`` calls (forward, loss, backward, AdamW, EMA) on one fixed
batch already on the device, after warm-up, with CUDA events on a GPU and perf_counter on a
CPU. Prints steps/s and img/s per path, and the speed-up over ``fp32``.

    python benchmarks/train_throughput.py                        # GPU: small32, batch 128
    python benchmarks/train_throughput.py --device cpu --config tiny32 --batch_size 8

Paths: ``fp32`` (eager, einsum attention: the original's arithmetic), ``auto`` (eager, the
default attention: SDPA on GPUs, chunked batched matmuls on CPUs), ``channels_last``,
``bf16`` (autocast, fp32 weights), ``fp16`` (fp16 trunk, fp32 master params, loss scaling),
``compile`` (torch.compile), ``fast`` (compile + bf16 + channels_last).
"""

from __future__ import annotations

import argparse
import time

import torch

from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.train_util import TrainLoop
from guided_diffusion.unet import set_attention_impl

CONFIGS = {
    # the bundled Fashion-MNIST model (grey, class-conditional with a null class)
    "fmnist32": dict(
        image_size=32,
        in_channels=1,
        class_cond=True,
        num_classes=10,
        class_dropout_prob=0.1,
        num_channels=32,
        num_res_blocks=2,
        channel_mult="1,2,2,2",
        attention_resolutions="8",
        num_head_channels=32,
    ),
    # the previous demo model's architecture
    "tiny32": dict(
        image_size=32,
        num_channels=32,
        num_res_blocks=2,
        channel_mult="1,2,2",
        attention_resolutions="16",
        num_head_channels=32,
    ),
    # ~11M parameters at 32x32: the training anchor of issue 9 (8.2 steps/s at batch 128 on
    # an H100 with the original code, fp32)
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
    # name: (attention, use_bf16, use_fp16, channels_last, compile)
    "fp32": ("einsum", False, False, False, False),
    "auto": ("auto", False, False, False, False),
    "channels_last": ("auto", False, False, True, False),
    "bf16": ("auto", True, False, True, False),
    "fp16": ("auto", False, True, True, False),
    "compile": ("auto", False, False, False, True),
    "fast": ("auto", True, False, True, True),
}


def config_flags(name: str) -> dict:
    """Model and diffusion flags of a benchmark config."""
    flags = model_and_diffusion_defaults()
    flags.update(
        learn_sigma=True,
        noise_schedule="cosine",
        resblock_updown=True,
        use_new_attention_order=True,
        dropout=0.1,
        **CONFIGS[name],
    )
    return flags


def time_steps(loop: TrainLoop, batch, cond, device: torch.device, iters: int) -> float:
    """Mean seconds per training step over ``iters`` steps."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            loop.run_step(batch, cond)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        loop.run_step(batch, cond)
    return (time.perf_counter() - t0) / iters


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="cuda or cpu")
    p.add_argument("--config", default="", help=f"one of {list(CONFIGS)} ('' = small32 on "
                   "cuda, tiny32 on cpu)")  # fmt: skip
    p.add_argument("--batch_size", type=int, default=0, help="0 = 128 on cuda, 8 on cpu")
    p.add_argument(
        "--paths",
        default="",
        help=f"comma list of {list(PATHS)} ('' = all on cuda; fp32,auto,channels_last,bf16 on cpu)",
    )
    p.add_argument("--iters", type=int, default=0, help="timed steps (0 = 50 on cuda, 5 on cpu)")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps (0 = 10 cuda, 2 cpu)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    args = p.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    config = args.config or ("small32" if on_gpu else "tiny32")
    batch_size = args.batch_size or (128 if on_gpu else 8)
    paths = args.paths or ("fp32,auto,channels_last,bf16,fp16,compile,fast" if on_gpu
                           else "fp32,auto,channels_last,bf16")  # fmt: skip
    iters = args.iters or (50 if on_gpu else 5)
    warmup = args.warmup or (10 if on_gpu else 2)
    torch.backends.cuda.matmul.allow_tf32 = True  # what a training run gets on Ampere+
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True

    flags = config_flags(config)
    g = torch.Generator().manual_seed(0)
    size = flags["image_size"]
    batch = torch.rand(batch_size, flags["in_channels"], size, size, generator=g) * 2 - 1
    batch = batch.to(device)
    cond = {}
    if flags["class_cond"]:
        cond["y"] = torch.randint(0, flags["num_classes"], (batch_size,), generator=g).to(device)
    n_params = None
    where = torch.cuda.get_device_name(device) if on_gpu else f"cpu x{torch.get_num_threads()}"
    results = {}
    for name in paths.split(","):
        attn, use_bf16, use_fp16, channels_last, compile_model = PATHS[name]
        torch.manual_seed(0)
        model, diffusion = create_model_and_diffusion(**flags)
        n_params = sum(q.numel() for q in model.parameters()) / 1e6
        set_attention_impl(model, attn)
        model.to(device)
        loop = TrainLoop(
            model=model,
            diffusion=diffusion,
            data=iter(()),
            batch_size=batch_size,
            microbatch=-1,
            lr=1e-4,
            ema_rate="0.9999",
            log_interval=10**9,
            save_interval=10**9,
            resume_checkpoint="",
            use_fp16=use_fp16,
            use_bf16=use_bf16,
            channels_last=channels_last,
            compile=compile_model,
        )
        t0 = time.perf_counter()
        for _ in range(warmup):
            loop.run_step(batch, cond)
        if on_gpu:
            torch.cuda.synchronize()
        warm_s = time.perf_counter() - t0
        step_s = time_steps(loop, batch, cond, device, iters)
        results[name] = step_s
        speedup = results.get("fp32", step_s) / step_s
        print(
            f"{name:14s} {1 / step_s:8.2f} steps/s  {batch_size / step_s:9.1f} img/s  "
            f"x{speedup:5.2f} vs fp32  (warm-up {warm_s:6.1f} s)",
            flush=True,
        )
    print(
        f"{config}: {n_params:.1f}M params, batch {batch_size}, {where}, torch {torch.__version__}"
    )


if __name__ == "__main__":
    main()
