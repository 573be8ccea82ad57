"""Sampling throughput of the ADM UNet: the plain reference path versus the fast paths.

Builds an official configuration (random weights; the flags come from the recorded layouts
of the official checkpoints) or a small one, and times, for every path, one UNet pass and
one sampling step (``p_sample`` with Epsilon Scaling: the network plus the sampler's
per-step work). Paths are timed in interleaved repeats (plain, default, bf16, plain,
default, ...), so drifting load on a shared machine hits them alike; each repeat times
``--iters`` calls after warm-up (wall clock: CUDA events on a GPU, perf_counter on a CPU;
``--clock cpu`` takes the process's CPU time instead, which other jobs on a shared machine
barely disturb: with one thread it is the pass's time, with several the work of all).
Printed per path: ms per pass and per step (min/median/max over the repeats), the speed-up
over the plain path (plain time / path time of the same repeat: min/median/max), and the
relative error of the output against the plain path on the same inputs.

Paths: ``plain`` is the original's computation (einsum attention, contiguous memory, fp32);
``default`` is what the sampling scripts run (``fast_path.optimize_for_sampling`` with its
device defaults, fp32); ``bf16`` / ``fp16`` run the trunk in half precision; ``fast`` and
``fast-graphs`` add ``torch.compile`` (GPU).

    python benchmarks/sample_throughput.py --device cpu --config fmnist32 --batch_size 64
    python benchmarks/sample_throughput.py --device cpu --config cifar10_uncond_32 --threads 1
    python benchmarks/sample_throughput.py --config imagenet64_cond --paths default,fp16,fast
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from guided_diffusion.fast_path import cpu_supports_fast_bf16, optimize_for_sampling
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
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
    # the bundled Fashion-MNIST model (class-conditional, grey, classifier-free guidance)
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
    # the previous demo model
    "tiny32": dict(
        image_size=32,
        num_channels=32,
        num_res_blocks=2,
        channel_mult="1,2,2",
        attention_resolutions="16",
        num_head_channels=32,
    ),
    # a ~11M-parameter 32x32 model like the training anchor
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
    # name: (attention, channels_last (None: the device default), precision, compile mode)
    "plain": ("einsum", False, "fp32", None),
    "default": ("auto", None, "fp32", None),
    "bf16": ("auto", None, "bf16", None),
    "fp16": ("auto", None, "fp16", None),
    "fast": ("auto", None, "bf16", "max-autotune-no-cudagraphs"),
    "fast-graphs": ("auto", None, "bf16", "reduce-overhead"),
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


@torch.no_grad()
def random_weights(model: nn.Module, generator: torch.Generator) -> None:
    """Weights with the activation scales of a trained model (the golden fixture's init).

    conv/linear W ~ N(0, 1/fan_in), b ~ N(0, 0.05^2); GroupNorm w ~ 1 + N(0, 0.1^2),
    b ~ N(0, 0.05^2); embeddings ~ N(0, 0.5^2). (Tiny weights everywhere would shrink the
    activations into float denormals, whose arithmetic is slow on CPUs and would skew the
    timings; the zero-initialised output layers would make the output zero.)
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            m.weight.normal_(0, m.weight[0].numel() ** -0.5, generator=generator)
            if m.bias is not None:
                m.bias.normal_(0, 0.05, generator=generator)
        elif isinstance(m, nn.GroupNorm):
            m.weight.normal_(1, 0.1, generator=generator)
            m.bias.normal_(0, 0.05, generator=generator)
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0, 0.5, generator=generator)


def timer(device: torch.device, clock: str = "wall"):
    """A function that runs ``fn`` ``n`` times and returns the mean seconds per call."""
    now = time.process_time if clock == "cpu" else time.perf_counter

    def run(fn, n: int) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000 / n
        t0 = now()
        for _ in range(n):
            fn()
        return (now() - t0) / n

    return run


def build_path(name: str, flags: dict, state: dict, device: torch.device):
    """The sampling callable of one path, built from the shared random weights."""
    attention, channels_last, precision, compile_mode = PATHS[name]
    model, _ = create_model_and_diffusion(**flags)
    model.load_state_dict(state)
    model.to(device)
    set_attention_impl(model, attention)
    return optimize_for_sampling(
        model,
        device=device,
        channels_last=channels_last,
        compile=compile_mode is not None,
        compile_mode=compile_mode or "default",
        precision=precision,
    )


def skip_reason(name: str, device: torch.device) -> str:
    precision, compile_mode = PATHS[name][2], PATHS[name][3]
    if device.type == "cpu":
        if precision == "fp16":
            return "fp16 needs a GPU"
        if precision == "bf16" and not cpu_supports_fast_bf16():
            return "this CPU has no AVX512-BF16/AMX: bf16 would be emulated"
        if compile_mode is not None:
            return "torch.compile takes minutes to warm up on a CPU (run it on a GPU)"
    return ""


def spread(values, digits: int = 2) -> str:
    """min/median/max, with ``digits`` decimals (none for values of 100 and more)."""

    def fmt(v: float) -> str:
        return f"{v:.0f}" if v >= 100 else f"{v:.{digits}f}"

    return "/".join(fmt(v) for v in (min(values), statistics.median(values), max(values)))


def main() -> None:
    names = sorted(README_BATCH) + sorted(SMALL)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="fmnist32", help=f"one of {names}")
    p.add_argument(
        "--batch_size", type=int, default=0, help="0: the README batch size on GPUs, 16 on CPUs"
    )
    p.add_argument(
        "--paths", default="", help=f"comma list of {list(PATHS)} (default: plain,default,bf16)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved repeats of every path")
    p.add_argument("--iters", type=int, default=2, help="timed calls per path and repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of every path first")
    p.add_argument(
        "--clock",
        default="wall",
        choices=("wall", "cpu"),
        help="wall clock, or the process's CPU time (robust on a shared machine)",
    )
    args = p.parse_args()
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        p.error("--clock cpu times CPU work: use it with --device cpu")
    if args.config not in names:
        p.error(f"unknown --config {args.config!r}; choose from {names}")
    paths = (args.paths or "plain,default,bf16").split(",")
    unknown = [n for n in paths if n not in PATHS]
    if unknown:
        p.error(f"unknown --paths {unknown}; choose from {list(PATHS)}")
    if paths[0] != "plain":
        paths.insert(0, "plain")  # the reference of the ratios and errors
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    flags = config_flags(args.config)
    batch = args.batch_size or (README_BATCH.get(args.config, 64) if device.type == "cuda" else 16)
    g = torch.Generator().manual_seed(0)
    model, diffusion = create_model_and_diffusion(**flags)
    random_weights(model, g)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    size, channels = flags["image_size"], flags["in_channels"]
    x = torch.randn(batch, channels, size, size, generator=g).to(device)
    t = torch.full((batch,), 50, device=device, dtype=torch.long)  # a respaced step index
    t_model = diffusion.timestep_map[50] * torch.ones_like(t)  # the UNet's timestep
    kwargs = {}
    if flags["class_cond"]:
        kwargs["y"] = torch.randint(0, flags["num_classes"], (batch,), generator=g).to(device)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.to(device)(x[:1], t_model[:1], **{k: v[:1] for k, v in kwargs.items()})
    gflop = fc.get_total_flops() / 1e9
    del model

    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        bf16 = "yes" if cpu_supports_fast_bf16() else "no"
        hardware = f"cpu ({torch.backends.cpu.get_cpu_capability()}, fast bf16: {bf16})"
    n_params = sum(v.numel() for v in state.values() if v.is_floating_point()) / 1e6
    print(
        f"{args.config}: {n_params:.1f}M params, {gflop:.2f} GFLOP/img, batch {batch}, "
        f"{torch.get_num_threads()} thread(s), {hardware}, torch {torch.__version__}; "
        f"{args.repeats} interleaved repeats of {args.iters} calls, {args.clock} clock"
    )
    fns = {}
    for name in paths:
        reason = skip_reason(name, device)
        if reason:
            print(f"{name:12s} skipped: {reason}")
            continue
        fns[name] = build_path(name, flags, state, device)
    run = timer(device, args.clock)
    pass_s = {name: [] for name in fns}
    step_s = {name: [] for name in fns}
    outputs = {}
    g_step = torch.Generator(device=device).manual_seed(1)

    def sample_step(fn):
        return diffusion.p_sample(fn, x, t, model_kwargs=kwargs, generator=g_step)

    with torch.inference_mode():
        for name, fn in fns.items():
            outputs[name] = fn(x, t_model, **kwargs)
            for _ in range(args.warmup):
                fn(x, t_model, **kwargs)
                sample_step(fn)
        for _ in range(args.repeats):
            for name, fn in fns.items():
                pass_s[name].append(run(lambda f=fn: f(x, t_model, **kwargs), args.iters))
                step_s[name].append(run(lambda f=fn: sample_step(f), args.iters))
    print(
        f"{'path':12s} {'ms/pass min/med/max':>22s} {'ms/step min/med/max':>22s} "
        f"{'plain/path pass':>18s} {'plain/path step':>18s} {'img/s@20':>9s} {'rel.err':>8s}"
    )
    ref = outputs["plain"]
    for name in fns:
        rel = float((outputs[name] - ref).norm() / ref.norm())
        ratio_pass = [a / b for a, b in zip(pass_s["plain"], pass_s[name])]
        ratio_step = [a / b for a, b in zip(step_s["plain"], step_s[name])]
        print(
            f"{name:12s} {spread([s * 1e3 for s in pass_s[name]], 1):>22s} "
            f"{spread([s * 1e3 for s in step_s[name]], 1):>22s} "
            f"{spread(ratio_pass):>18s} {spread(ratio_step):>18s} "
            f"{batch / (statistics.median(step_s[name]) * 20):9.2f} {rel:8.1e}"
        )


if __name__ == "__main__":
    main()
