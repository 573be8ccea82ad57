"""One-call GPU check (issue 16): sampling, training and evaluator throughput vs the original.

Within a time budget (``--budget_s``, default 400 s: the whole run stays under 8 minutes)
it measures, on one GPU with the CUDA build of torch:

- **sampling**, for the four official configs at their README batch sizes (CIFAR-10 512
  fp32, ImageNet-64 256 fp16, FFHQ-128 128 fp16, ImageNet-128 100 fp16; random weights,
  flags from the recorded checkpoint layouts): the time of one UNet pass (CUDA events after
  warm-up) on three paths. ``plain`` is the original's arithmetic (einsum attention, NCHW,
  eager; the fp16 trunk of ``--use_fp16`` where the config samples in fp16); ``default``
  is what ``scripts/image_sample.py`` runs with its default flags (``load_unet`` +
  ``optimize_for_sampling``: SDPA attention, channels-last); ``fastest`` adds
  ``--compile True --compile_mode reduce-overhead`` (torch.compile with CUDA graphs). For
  the fp32 config, ``fastest-fp16`` also takes the fp16 trunk. Printed: ms per pass,
  img/s at 100 steps (batch / (100 x pass time): one pass per step), effective TFLOP/s
  (FLOPs counted by ``torch.utils.flop_counter``), the relative L2 error of the output
  against strict fp32 (TF32 off) on the same inputs, and the speed-up over ``plain``;
- **training** img/s of the 11M-parameter 32x32 model at batch 128
  (``benchmarks/train_throughput.py``'s ``small32``): fp32 eager (einsum attention) vs
  bf16 autocast + channels-last + torch.compile (``fast``);
- **evaluator** Inception activations/s (``benchmarks/eval_throughput.py``).

Each rate is printed beside the original code's (measured on an H100: 114 / 416 / 623 /
353 ms per UNet pass at those batch sizes, 8.2 training steps/s at batch 128) with the
ratio and the issue's target (2.5x on ImageNet-64 and FFHQ-128, 2x on CIFAR-10 and
ImageNet-128, 4x training; ``default`` must not be slower than ``plain``). A failing
measurement prints its error and the run goes on; a summary table ends the run. The
timing flags are the scripts' own (torch's TF32 defaults; nothing is tuned here).

    bash benchmarks/gpu_check.sh                # GPU: the check (under 8 minutes)
    bash benchmarks/gpu_check.sh --dry-run      # CPU: tiny configs, one iteration each

``--dry-run`` runs every code path on the CPU with tiny models; torch.compile uses the
``eager`` backend there (dynamo tracing without code generation), so it runs in seconds.
"""

from __future__ import annotations

import argparse
import gc
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import eval_throughput  # noqa: E402
import sample_throughput  # noqa: E402
import train_throughput  # noqa: E402

from guided_diffusion.sample_util import (  # noqa: E402
    load_unet,
    optimize_for_sampling,
    sampling_defaults,
)
from guided_diffusion.script_util import (  # noqa: E402
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.train_util import TrainLoop  # noqa: E402
from guided_diffusion.unet import set_attention_impl  # noqa: E402

# The original code on an H100 (issue 16): ms per UNet pass at the README batch size.
ORIGINAL_MS = {
    "cifar10_uncond_32": 114.0,
    "imagenet64_cond": 416.0,
    "ffhq_128": 623.0,
    "imagenet128_cond": 353.0,
}
# The issue's targets: img/s at least this many times the original's.
TARGET = {
    "cifar10_uncond_32": 2.0,
    "imagenet64_cond": 2.5,
    "ffhq_128": 2.5,
    "imagenet128_cond": 2.0,
}
ORIGINAL_TRAIN_STEPS_S, TRAIN_BATCH, TRAIN_TARGET = 8.2, 128, 4.0
SAMPLE_STEPS = 100
DRY_FLAGS = dict(  # --dry-run: a tiny 16x16 UNet with attention at 8x8
    image_size=16,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="8",
    num_head_channels=16,
    learn_sigma=True,
    noise_schedule="cosine",
    resblock_updown=True,
    use_new_attention_order=True,
    timestep_respacing="100",
)


class NotMeasured(Exception):
    """A measurement that depends on one that failed (reported as skipped, no traceback)."""


class OutOfTime(BaseException):
    """Raised by the alarm at the hard deadline (a BaseException: no library swallows it)."""


_STATE = {"in_task": False, "out_of_time": False}


def _alarm(signum, frame):
    """At the hard deadline: interrupt the measurement in flight; no new one starts."""
    _STATE["out_of_time"] = True
    if _STATE["in_task"]:
        raise OutOfTime()


@dataclass
class Row:
    """One measurement; ``rate`` is img/s at 100 steps, training img/s or activations/s."""

    section: str
    config: str
    path: str
    precision: str
    batch: int
    ms: Optional[float] = None
    rate: Optional[float] = None
    tflops: Optional[float] = None
    rel_err: Optional[float] = None
    speedup: Optional[float] = None  # over the section's baseline path (plain / fp32)
    original: Optional[float] = None  # the original code's rate
    target: Optional[float] = None  # required ratio to the original
    error: Optional[str] = None

    def verdict(self) -> str:
        if self.error:
            return self.error
        if self.target is not None and self.original:
            ok = self.rate / self.original >= self.target
            return "ok" if ok else f"below the {self.target:g}x target"
        if self.path == "default" and self.speedup is not None:
            return "ok (not slower than plain)" if self.speedup >= 1 else "SLOWER than plain"
        return ""


def fmt(value: Optional[float], spec: str) -> str:
    """``value`` in ``spec`` (e.g. ``9.2f``), or a dash of the same width when missing."""
    width = int(spec.split(".")[0])
    return "-".rjust(width) if value is None or not math.isfinite(value) else format(value, spec)


HEADER = (
    f"{'section':7s} {'config':18s} {'path':12s} {'prec':4s} {'batch':>5s} {'ms':>9s} "
    f"{'rate':>10s} {'TFLOP/s':>7s} {'rel.err':>8s} {'x base':>6s} {'original':>9s} "
    f"{'x orig':>6s} {'target':>6s}  verdict"
)


def row_line(r: Row) -> str:
    ratio = r.rate / r.original if r.rate and r.original else None
    return (
        f"{r.section:7s} {r.config:18s} {r.path:12s} {r.precision:4s} {r.batch:5d} "
        f"{fmt(r.ms, '9.2f')} {fmt(r.rate, '10.2f')} {fmt(r.tflops, '7.2f')} "
        f"{fmt(r.rel_err, '8.1e')} {fmt(r.speedup, '6.2f')} {fmt(r.original, '9.2f')} "
        f"{fmt(ratio, '6.2f')} {fmt(r.target, '6.1f')}  {r.verdict()}"
    )


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"FAILED: {type(e).__name__}: {text[:200]}"


# ----------------------------------------------------------------------------- sampling


def random_weights(model: torch.nn.Module) -> None:
    """Random weights everywhere, as sample_throughput.py (the output convs start at 0)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.normal_(0, 0.01)


class strict_fp32:
    """No TF32 in matmuls or convolutions inside the block (the error reference)."""

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.old


class SampleConfig:
    """A config's random checkpoint (on disk, for load_unet), inputs and fp32 reference."""

    def __init__(self, name: str, flags: dict, batch: int, device: torch.device, tmp: Path):
        self.name, self.flags, self.batch, self.device = name, flags, batch, device
        torch.manual_seed(0)
        model, diffusion = create_model_and_diffusion(**flags)
        random_weights(model)
        self.model_path = str(tmp / f"{name}.pt")
        torch.save(model.state_dict(), self.model_path)
        size, channels = flags["image_size"], flags.get("in_channels", 3)
        g = torch.Generator(device=device).manual_seed(0)
        self.x = torch.randn(batch, channels, size, size, device=device, generator=g)
        # the model's timestep of step 50 of the 100 respaced steps
        step = int(diffusion.timestep_map[SAMPLE_STEPS // 2])
        self.t = torch.full((batch,), step, device=device, dtype=torch.long)
        self.kwargs = {}
        if flags["class_cond"]:
            y = torch.randint(0, flags["num_classes"], (batch,), device=device, generator=g)
            self.kwargs["y"] = y
        model.eval().to(device)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(self.x[:1], self.t[:1], **{k: v[:1] for k, v in self.kwargs.items()})
        self.gflop = fc.get_total_flops() / 1e9
        self.params_m = sum(p.numel() for p in model.parameters()) / 1e6
        del model
        with strict_fp32():
            self.reference = self.forward(self.build("plain", fp16=False), iters=0, warmup=0)[0]

    def args(self, fp16: bool, **overrides) -> argparse.Namespace:
        """The flags scripts/image_sample.py would hold for this config."""
        values = {**sampling_defaults(), **self.flags, "model_path": self.model_path}
        values.update(use_fp16=fp16, use_bf16=False, **overrides)
        return argparse.Namespace(**values)

    def build(self, path: str, fp16: bool) -> Callable:
        if path == "plain":  # the original's arithmetic: einsum attention, NCHW, eager
            model = load_unet(self.args(fp16), self.device)
            return set_attention_impl(model, "einsum")
        if path == "default":
            args = self.args(fp16)
        else:  # fastest: torch.compile with CUDA graphs
            args = self.args(fp16, compile=True, compile_mode="reduce-overhead")
        return optimize_for_sampling(load_unet(args, self.device), args, self.device)

    def forward(self, fn: Callable, iters: int, warmup: int):
        """(output, seconds per pass) after ``warmup`` untimed passes."""
        graphs = self.device.type == "cuda" and hasattr(torch.compiler, "cudagraph_mark_step_begin")

        def call():
            if graphs:  # each pass a new CUDA-graph step (outputs are not kept across them)
                torch.compiler.cudagraph_mark_step_begin()
            return fn(self.x, self.t, **self.kwargs)

        with torch.inference_mode():
            for _ in range(warmup):
                call()
            seconds = sample_throughput.timer(self.device)(call, iters) if iters else None
            out = call().float().clone()  # clone: CUDA-graph outputs are reused buffers
        return out, seconds

    def measure(self, path: str, fp16: bool, iters: int, warmup: int, plain_rate=None) -> Row:
        fn = self.build(path, fp16)
        out, seconds = self.forward(fn, iters, warmup)
        rate = self.batch / (SAMPLE_STEPS * seconds)
        original = ORIGINAL_MS.get(self.name)
        return Row(
            section="sample",
            config=self.name,
            path=path,
            precision="fp16" if fp16 else "fp32",
            batch=self.batch,
            ms=seconds * 1e3,
            rate=rate,
            tflops=self.gflop * self.batch / seconds / 1e3,
            rel_err=float((out - self.reference).norm() / self.reference.norm()),
            speedup=None if plain_rate is None else rate / plain_rate,
            original=None if original is None else self.batch * 1e3 / (SAMPLE_STEPS * original),
            target=TARGET.get(self.name) if path.startswith("fastest") else None,
        )


# ----------------------------------------------------------------------------- training


def train_row(config: str, path: str, batch: int, device, iters: int, warmup: int) -> Row:
    """Steps of ``TrainLoop.run_step`` on one fixed batch, as train_throughput.py times them."""
    attn, use_bf16, use_fp16, channels_last, compile_model = train_throughput.PATHS[path]
    flags = train_throughput.config_flags(config)
    g = torch.Generator().manual_seed(0)
    size, channels = flags["image_size"], flags.get("in_channels", 3)
    data = (torch.rand(batch, channels, size, size, generator=g) * 2 - 1).to(device)
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**flags)
    set_attention_impl(model, attn)
    model.to(device)
    loop = TrainLoop(
        model=model,
        diffusion=diffusion,
        data=iter(()),
        batch_size=batch,
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
    for _ in range(warmup):
        loop.run_step(data, {})
    seconds = train_throughput.time_steps(loop, data, {}, device, iters)
    return Row(
        section="train",
        config=config,
        path=path,
        precision="bf16" if use_bf16 else ("fp16" if use_fp16 else "fp32"),
        batch=batch,
        ms=seconds * 1e3,
        rate=batch / seconds,
        original=ORIGINAL_TRAIN_STEPS_S * TRAIN_BATCH if batch == TRAIN_BATCH else None,
        target=TRAIN_TARGET if path == "fast" and batch == TRAIN_BATCH else None,
    )


# ----------------------------------------------------------------------------- the run


@dataclass
class Task:
    """A measurement: its row if it fails, the seconds it needs left to start, the work."""

    placeholder: Row
    min_left_s: float
    run: Callable[[], List[Row]]


class Check:
    """The state of one run: device, iterations, the sampling configs' shared inputs."""

    def __init__(self, device: torch.device, iters: int, warmup: int, tmp: Path):
        self.device, self.iters, self.warmup, self.tmp = device, iters, warmup, tmp
        self.contexts: Dict[str, SampleConfig] = {}
        self.plain_rates: Dict[str, float] = {}
        self.train_fp32_rate: Optional[float] = None

    def plain(self, name: str, batch: int, fp16: bool, flags: dict) -> List[Row]:
        ctx = SampleConfig(name, flags, batch, self.device, self.tmp)
        self.contexts[name] = ctx
        print(
            f"sample {name}: {ctx.params_m:.1f}M params, {ctx.gflop:.2f} GFLOP/img, batch {batch}",
            flush=True,
        )
        row = ctx.measure("plain", fp16, self.iters, self.warmup)
        self.plain_rates[name] = row.rate
        return [row]

    def path(self, name: str, path: str, fp16: bool, label: str = "") -> List[Row]:
        if name not in self.plain_rates:
            raise NotMeasured("skipped: the plain path of this config failed")
        ctx = self.contexts[name]
        row = ctx.measure(path, fp16, self.iters, self.warmup, self.plain_rates[name])
        row.path = label or path
        return [row]

    def train(self, config: str, path: str, batch: int) -> List[Row]:
        row = train_row(config, path, batch, self.device, self.iters, self.warmup)
        if path == "fp32":
            self.train_fp32_rate = row.rate
        elif self.train_fp32_rate:
            row.speedup = row.rate / self.train_fp32_rate
        return [row]

    def evaluator(self, size: int, batch: int, batches: int) -> List[Row]:
        r = eval_throughput.measure("inception", self.device.type, size, batch, batches)
        rate = r["activations_per_s"]
        return [
            Row("eval", f"inception-{size}px", "default", "fp32", batch, batch / rate * 1e3, rate)
        ]


def plan(check: Check, args: argparse.Namespace) -> List[Task]:
    """The measurements in order: cheap eager work first, compiled paths (a minute or more
    of compilation each on a GPU) last, so a slow compiler costs the least."""
    sections = args.sections.split(",")
    if args.dry_run:
        configs = [
            ("tiny-fp32", 2, False, {**model_and_diffusion_defaults(), **DRY_FLAGS}),
            (
                "tiny-fp16-cond",
                2,
                True,
                {
                    **model_and_diffusion_defaults(),
                    **DRY_FLAGS,
                    "class_cond": True,
                    "num_classes": 10,
                },
            ),
        ]
        train_config, train_batch, evaluation = "tiny32", 2, (32, 2, 1)
    else:
        configs = [
            (n, sample_throughput.README_BATCH[n], n != "cifar10_uncond_32", None)
            for n in args.configs.split(",")
        ]
        train_config, train_batch, evaluation = "small32", TRAIN_BATCH, (64, 200, 20)
    if "sample" not in sections:
        configs = []
    tasks = []
    for name, batch, fp16, flags in configs:
        prec = "fp16" if fp16 else "fp32"
        flags = flags or sample_throughput.config_flags(name)
        tasks.append(
            Task(
                Row("sample", name, "plain", prec, batch),
                20,
                partial(check.plain, name, batch, fp16, flags),
            )
        )
        tasks.append(
            Task(
                Row("sample", name, "default", prec, batch),
                20,
                partial(check.path, name, "default", fp16),
            )
        )
    if "eval" in sections:
        tasks.append(
            Task(
                Row("eval", f"inception-{evaluation[0]}px", "default", "fp32", evaluation[1]),
                15,
                partial(check.evaluator, *evaluation),
            )
        )
    for path in ("fp32", "fast") if "train" in sections else ():
        tasks.append(
            Task(
                Row("train", train_config, path, "", train_batch),
                20 if path == "fp32" else 90,
                partial(check.train, train_config, path, train_batch),
            )
        )
    for name, batch, fp16, _ in configs:
        tasks.append(
            Task(
                Row("sample", name, "fastest", "fp16" if fp16 else "fp32", batch),
                90,
                partial(check.path, name, "fastest", fp16),
            )
        )
    for name, batch, fp16, _ in configs:
        if not fp16:  # the fp32 config's fastest path with the fp16 trunk as well
            tasks.append(
                Task(
                    Row("sample", name, "fastest-fp16", "fp16", batch),
                    90,
                    partial(check.path, name, "fastest", True, "fastest-fp16"),
                )
            )
    return tasks


def run_tasks(tasks: List[Task], budget_s: float, start: float, dry: bool) -> List[Row]:
    """Run every task that the budget allows; a failure becomes its row's error."""
    rows: List[Row] = []
    if not dry:  # past budget + 60 s, the measurement in flight is interrupted
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(int(budget_s + 60))
    for task in tasks:
        new = [task.placeholder]
        left = budget_s - (time.monotonic() - start)
        if _STATE["out_of_time"] or (not dry and left < task.min_left_s):
            task.placeholder.error = "skipped: time budget (rerun with --configs/--sections)"
        else:
            try:
                _STATE["in_task"] = True
                new = task.run()
            except NotMeasured as e:
                task.placeholder.error = str(e)
            except OutOfTime:
                task.placeholder.error = "FAILED: interrupted at the time limit"
            except Exception as e:  # one failing measurement must not stop the check
                traceback.print_exc(limit=4, file=sys.stderr)
                task.placeholder.error = one_line(e)
            finally:
                _STATE["in_task"] = False
        for r in new:
            rows.append(r)
            print(row_line(r), flush=True)
        gc.collect()
        torch._dynamo.reset()  # free compiled graphs and CUDA-graph memory pools
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    signal.alarm(0)
    return rows


def summary(rows: List[Row], header: str, dry: bool = False) -> str:
    """The final table: sampling by config and path, then training, then the evaluator."""
    sections, paths = (
        ["sample", "train", "eval"],
        ["plain", "default", "fastest", "fastest-fp16", "fp32", "fast"],
    )
    configs = list(dict.fromkeys(r.config for r in rows))
    rows = sorted(
        rows,
        key=lambda r: (sections.index(r.section), configs.index(r.config), paths.index(r.path)),
    )
    failed = sum(r.error is not None and r.error.startswith("FAILED") for r in rows)
    return "\n".join(
        [
            f"== summary: {header} ==",
            "rate: sample img/s at 100 steps (one UNet pass per step), train img/s, eval "
            "activations/s; x base: over plain (sample) or fp32 (train); original: the "
            "original code on an H100 (issue 16); rel.err: relative L2 error vs strict fp32",
            *(
                [
                    "dry run: tiny models, one pass each on a CPU: it checks the code paths; "
                    "its timings and verdicts mean nothing"
                ]
                if dry
                else []
            ),
            HEADER,
            *map(row_line, rows),
            f"{len(rows)} rows, {failed} failed",
        ]
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny configs on the CPU (seconds)")
    p.add_argument("--budget_s", type=float, default=400, help="start no measurement after this")
    p.add_argument("--iters", type=int, default=0, help="timed passes (0: 10 on GPU, 1 dry)")
    p.add_argument("--warmup", type=int, default=0, help="untimed passes (0: 3 on GPU, 1 dry)")
    p.add_argument(
        "--configs",
        default=",".join(ORIGINAL_MS),
        help=f"comma list of sampling configs out of {list(ORIGINAL_MS)}",
    )
    p.add_argument("--sections", default="sample,train,eval", help="comma list of sections")
    args = p.parse_args(argv)
    unknown = set(args.configs.split(",")) - set(ORIGINAL_MS)
    if unknown:
        p.error(f"unknown --configs {sorted(unknown)}; choose from {list(ORIGINAL_MS)}")
    unknown = set(args.sections.split(",")) - {"sample", "train", "eval"}
    if unknown:
        p.error(f"unknown --sections {sorted(unknown)}; choose from sample, train, eval")
    return args


def environment(device: torch.device) -> str:
    """The card (or CPU), CUDA and torch versions and the commit: the numbers' context."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        where = f"cpu x{torch.get_num_threads()}"
    return f"{where}, torch {torch.__version__}, commit {commit or '?'}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device: run it on a GPU machine with the CUDA build of torch "
            "(pip install torch), or use --dry-run",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:  # compile wiring without code generation: seconds on a CPU
        real_compile = torch.compile
        torch.compile = lambda model, **kw: real_compile(model, backend="eager")
    start = time.monotonic()
    header = environment(device)
    print(f"gpu_check{' --dry-run' if args.dry_run else ''}: {header}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        check = Check(
            device,
            iters=args.iters or (1 if args.dry_run else 10),
            warmup=args.warmup or (1 if args.dry_run else 3),
            tmp=tmp,
        )
        rows = run_tasks(plan(check, args), args.budget_s, start, args.dry_run)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(summary(rows, f"{header}, {time.monotonic() - start:.0f} s", args.dry_run))
    return 1 if any(r.error and r.error.startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
