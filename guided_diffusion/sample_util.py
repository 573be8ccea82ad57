"""The sampling job behind ``image_sample.py``, ``classifier_sample.py`` and
``super_res_sample.py``.

Work is split into global batches j = 0 .. J-1 of ``batch_size`` images; rank r takes the
batches with ``j % world_size == r``. Batch j draws everything (labels, x_T, per-step noise)
from its own generator seeded by ``(seed, j)``, so the result depends on neither the world
size nor on interruptions. Each finished batch is written atomically to
``<log_dir>/shards/``; a rerun of the same command skips the batches already there. When all
are done, rank 0 streams them into ``samples_{N}x{H}x{W}x3.npz`` (``arr_0`` uint8 NHWC,
``arr_1`` labels for class-conditional runs), writes a PNG grid of the first 64 images and
the run's flags as JSON, and removes the shards.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import dist_util, fast_path, logger
from .checkpoints import load_checkpoint_into, read_state_dict
from .cli import (  # noqa: F401 - re-exported: their old home was this module
    BUNDLED_FLAGS,
    BUNDLED_MODEL,
    REPO_ROOT,
    UserError,
    apply_bundled_model,
    cli,
    default_log_dir,
    explicit_flags,
    progress_bar,
    resolve_precision,
    start_script,
)
from .flags import COMPILE_MODES, FLAGS, SAMPLING_FLAGS, check_flags, flag_defaults
from .guidance import classifier_free_guidance
from .image_datasets import script_data_share
from .io_util import save_image_grid, save_npz_atomic, write_json_atomic, write_npz_streaming
from .script_util import create_model, diffusion_from_flags, model_and_diffusion_defaults
from .seeding import batch_seed, make_generator

# flags that do not change the samples: a rerun in the same --log_dir may change them
RUN_IDENTITY_EXCLUDE = ("log_dir", "progress", "compile", "compile_mode", "channels_last")
SAMPLING_CHOICES = {"compile_mode": COMPILE_MODES}
SAMPLING_HELP: Dict[str, str] = {name: FLAGS[name].help for name in SAMPLING_FLAGS}


def sampling_defaults() -> Dict[str, Any]:
    """Defaults of the flags shared by the sampling scripts (besides the model flags)."""
    return flag_defaults(SAMPLING_FLAGS)


def start_sampling_script(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """``cli.start_script(parser, "sample")`` (the old name)."""
    return start_script(parser, "sample")


def check_sampling_args(args: argparse.Namespace) -> None:
    """One-line errors for flags outside their ranges (``flags.check_flags``)."""
    check_flags(args, warn=False)


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class SamplingOptions:
    """How to run the sampling loop: the sampler and the exposure-bias fixes besides lambda.

    ``sampler``: ``ddpm``, ``ddim`` (``eta``) or ``dpmpp2m``; ``time_shift``: TS-DPM with
    ``ts_cutoff``/``ts_window``. Epsilon Scaling is a property of the diffusion
    (``GaussianDiffusion.with_eps_scaler``).
    """

    sampler: str = "ddpm"
    eta: float = 0.0
    clip_denoised: bool = True
    time_shift: bool = False
    ts_cutoff: int = 300
    ts_window: int = 20

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SamplingOptions:
        """From the sampling flags; ``--use_ddim True`` means ``--sampler ddim``."""
        sampler = getattr(args, "sampler", "ddpm")
        if getattr(args, "use_ddim", False):
            if sampler not in ("ddpm", "ddim"):
                raise UserError(f"--use_ddim True conflicts with --sampler {sampler}: drop one")
            sampler = "ddim"
        return cls(
            sampler=sampler,
            eta=float(getattr(args, "ddim_eta", 0.0)),
            clip_denoised=bool(getattr(args, "clip_denoised", True)),
            time_shift=bool(getattr(args, "time_shift", False)),
            ts_cutoff=int(getattr(args, "ts_cutoff", 300)),
            ts_window=int(getattr(args, "ts_window", 20)),
        )

    def loop_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of ``GaussianDiffusion.sample_loop_progressive``."""
        kwargs: Dict[str, Any] = dict(sampler=self.sampler, clip_denoised=self.clip_denoised)
        if self.sampler == "ddim":
            kwargs["eta"] = self.eta
        if self.time_shift:
            kwargs.update(time_shift=True, ts_cutoff=self.ts_cutoff, ts_window=self.ts_window)
        return kwargs

    def describe(self) -> str:
        text = self.sampler.upper() + (f" (eta {self.eta:g})" if self.sampler == "ddim" else "")
        if self.time_shift:
            text += f", time shift above t = {self.ts_cutoff} within +-{self.ts_window}"
        return text


# ----------------------------------------------------------------------------- batches


def to_uint8_nhwc(sample: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW floats -> uint8 NHWC, truncating like the original ADM scripts.

    Grey samples (C = 1) are replicated to 3 channels: the evaluator's RGB format.
    """
    out = ((sample + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    if out.shape[1] == 1:
        out = out.expand(-1, 3, -1, -1)
    return out.permute(0, 2, 3, 1).contiguous()


def generate_batch(
    model: Callable[..., torch.Tensor],
    diffusion,
    n: int,
    generator: torch.Generator,
    *,
    shape: Sequence[int],
    device: torch.device,
    options: SamplingOptions = SamplingOptions(),
    num_classes: Optional[int] = None,
    cond_fn=None,
    model_kwargs: Optional[Dict[str, torch.Tensor]] = None,
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Sample ``n`` images of ``shape`` (C, H, W) from pure noise, all draws from ``generator``.

    Labels (when ``num_classes`` is set) are drawn first, then x_T, then each step's noise.
    Raises ``NonFiniteSampleError`` (one line) naming the first step whose output is not
    finite: nothing of that batch is written.
    :return: (uint8 NHWC images, 3 channels; int64 labels or None).
    """
    model_kwargs = dict(model_kwargs or {})
    labels = None
    if num_classes is not None:
        labels = torch.randint(0, num_classes, (n,), generator=generator, device=device)
        model_kwargs["y"] = labels
    sample = diffusion.sample_loop(  # raises NonFiniteSampleError naming the first bad step
        model,
        (n, *shape),
        model_kwargs=model_kwargs,
        cond_fn=cond_fn,
        device=device,
        generator=generator,
        **options.loop_kwargs(),
    )
    images = to_uint8_nhwc(sample).cpu().numpy()
    return images, None if labels is None else labels.cpu().numpy().astype(np.int64)


# ----------------------------------------------------------------------------- the job


def output_name(num_samples: int, image_size: int) -> str:
    return f"samples_{num_samples}x{image_size}x{image_size}x3"


def run_identity(flags: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in sorted(flags.items()) if k not in RUN_IDENTITY_EXCLUDE}


def _check_manifest(
    log_dir: Path, shard_dir: Path, final: Path, flags: Dict[str, Any]
) -> Optional[str]:
    """Rank 0: refuse to mix runs with different flags in one log dir; None if all is well."""
    ident = run_identity(flags)
    for existing in (shard_dir / "run.json", final.with_name(final.stem + "_flags.json")):
        if existing.exists():
            old = run_identity(json.loads(existing.read_text()))
            diff = [k for k in sorted(set(old) | set(ident)) if old.get(k) != ident.get(k)]
            if diff:
                shown = ", ".join(
                    f"--{k} {old.get(k)!r} there vs {ident.get(k)!r} now" for k in diff[:4]
                )
                return (
                    f"--log_dir {log_dir} holds a sampling run with different flags ({shown}); "
                    "use another --log_dir or the same flags to resume"
                )
    return None


def _prepare_log_dir(log_path: Path, shard_dir: Path, final: Path, flags: Dict[str, Any]):
    """Rank 0: None to go on, "complete" if this run is finished, else the refusal message."""
    log_path.mkdir(parents=True, exist_ok=True)
    status = _check_manifest(log_path, shard_dir, final, flags)
    if status is None and final.exists() and not shard_dir.joinpath("run.json").exists():
        return "complete"
    if status is None:
        shard_dir.mkdir(parents=True, exist_ok=True)
        if not shard_dir.joinpath("run.json").exists():
            write_json_atomic(shard_dir / "run.json", flags)
    return status


def _shard_path(shard_dir: Path, j: int) -> Path:
    return shard_dir / f"batch_{j:06d}.npz"


def run_sampling(
    sample_batch: Callable[[int, int, torch.Generator], Tuple[np.ndarray, Optional[np.ndarray]]],
    *,
    flags: Dict[str, Any],
    log_dir: str,
    num_samples: int,
    batch_size: int,
    image_size: int,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> Optional[Path]:
    """Produce ``num_samples`` images with resumable, rank-split batches (see module doc).

    :param sample_batch: ``(j, n, generator) -> (uint8 NHWC images, labels or None)`` for
        global batch ``j`` of ``n`` images.
    :param flags: the run's flags (``image_size`` and ``num_samples`` included): a rerun in
        the same folder must agree on them (``RUN_IDENTITY_EXCLUDE`` aside).
    :return: the path of the final ``.npz`` on rank 0, None on other ranks.
    """
    log_path = Path(log_dir)
    shard_dir = log_path / "shards"
    name = output_name(num_samples, image_size)
    final = log_path / f"{name}.npz"
    rank, world = dist_util.get_rank(), dist_util.get_world_size()

    status = dist_util.on_rank0(_prepare_log_dir, log_path, shard_dir, final, flags)
    if status == "complete":
        dist_util.print0(f"{final} already holds the finished samples of this run; nothing to do")
        return final if rank == 0 else None
    if status is not None:
        raise UserError(status)

    num_batches = math.ceil(num_samples / batch_size)
    sizes = [min(batch_size, num_samples - j * batch_size) for j in range(num_batches)]
    done = [_shard_path(shard_dir, j).exists() for j in range(num_batches)]
    done_global = sum(s for s, d in zip(sizes, done) if d)
    if rank == 0 and done_global:
        logger.log(f"resuming: {done_global} of {num_samples} samples already in {shard_dir}")
    bar = progress_bar(num_samples, "sampling", enabled=progress, initial=done_global)
    for j in range(rank, num_batches, world):
        if done[j]:
            continue
        images, labels = sample_batch(j, sizes[j], make_generator(batch_seed(seed, j), device))
        arrays = {"arr_0": images}
        if labels is not None:
            arrays["arr_1"] = labels.astype(np.int64)
        save_npz_atomic(_shard_path(shard_dir, j), **arrays)
        bar.update(min(sizes[j] * world, bar.total - bar.n))
    bar.close()
    dist_util.barrier()

    flags_path = log_path / f"{name}_flags.json"
    dist_util.on_rank0(_assemble, shard_dir, num_batches, sizes, final, flags, flags_path)
    logger.log(f"saved {num_samples} samples to {final}")
    return final if rank == 0 else None


def sample_images(
    model: Callable[..., torch.Tensor],
    diffusion,
    *,
    log_dir: str,
    num_samples: int,
    batch_size: int,
    shape: Sequence[int],
    seed: int,
    device: torch.device,
    options: SamplingOptions = SamplingOptions(),
    num_classes: Optional[int] = None,
    cond_fn=None,
    flags: Optional[Dict[str, Any]] = None,
    progress: bool = True,
) -> Optional[Path]:
    """``num_samples`` images of ``shape`` (C, H, W) from ``model`` into ``log_dir`` (the
    resumable, rank-split job of ``run_sampling`` over ``generate_batch``).

    ``flags`` identify the run (a rerun in the same folder must agree on them); by default
    the sampling settings themselves. Returns the ``.npz`` path on rank 0, else None.
    """
    run_flags = dict(
        flags
        or dict(
            options.__dict__,
            eps_scaler=float(diffusion.eps_scaler),
            eps_scaler_k=float(diffusion.eps_scaler_k),
            batch_size=batch_size,
            seed=seed,
        )
    )
    run_flags.update(image_size=int(shape[-1]), num_samples=num_samples)

    def sample_batch(j: int, n: int, generator: torch.Generator):
        return generate_batch(
            model,
            diffusion,
            n,
            generator,
            shape=shape,
            device=device,
            options=options,
            num_classes=num_classes,
            cond_fn=cond_fn,
        )

    return run_sampling(
        sample_batch,
        flags=run_flags,
        log_dir=log_dir,
        num_samples=num_samples,
        batch_size=batch_size,
        image_size=int(shape[-1]),
        seed=seed,
        device=device,
        progress=progress,
    )


def sample_from_args(
    model: Callable[..., torch.Tensor],
    diffusion,
    args: argparse.Namespace,
    device: torch.device,
    *,
    cond_fn=None,
    draw_labels: Optional[bool] = None,
) -> Optional[Path]:
    """``sample_images`` with a sampling script's flags: ``--log_dir``, ``--num_samples``,
    ``--batch_size``, ``--seed``, ``--progress``, the sampler options and the image shape;
    labels are drawn when ``--class_cond`` (or ``draw_labels``, e.g. for a classifier)."""
    labels = args.class_cond if draw_labels is None else draw_labels
    return sample_images(
        model,
        diffusion,
        log_dir=args.log_dir,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        shape=(args.in_channels, args.image_size, args.image_size),
        seed=args.seed,
        device=device,
        options=SamplingOptions.from_args(args),
        num_classes=args.num_classes if labels else None,
        cond_fn=cond_fn,
        flags=vars(args),
        progress=args.progress,
    )


def _iter_shards(shard_dir: Path, num_batches: int, key: str) -> Iterator[np.ndarray]:
    for j in range(num_batches):
        with np.load(_shard_path(shard_dir, j)) as z:
            yield z[key]


def _assemble(
    shard_dir: Path,
    num_batches: int,
    sizes: List[int],
    final: Path,
    flags: Dict[str, Any],
    flags_path: Path,
) -> None:
    """Rank 0: stream the shards into the final npz, write the grid and flags, clean up."""
    missing = [j for j in range(num_batches) if not _shard_path(shard_dir, j).exists()]
    if missing:
        raise RuntimeError(
            f"{len(missing)} sample batches missing in {shard_dir} (first: {missing[0]})"
        )
    with np.load(_shard_path(shard_dir, 0)) as z:
        first = z["arr_0"]
        has_labels = "arr_1" in z.files
    total = sum(sizes)
    arrays = [
        (
            "arr_0",
            (total, *first.shape[1:]),
            np.uint8,
            _iter_shards(shard_dir, num_batches, "arr_0"),
        )
    ]
    if has_labels:
        arrays.append(("arr_1", (total,), np.int64, _iter_shards(shard_dir, num_batches, "arr_1")))
    write_npz_streaming(final, arrays)
    grid_images = np.concatenate(list(_first_images(shard_dir, num_batches, 64)), axis=0)
    save_image_grid(grid_images, final.with_suffix(".png"))
    write_json_atomic(flags_path, flags)
    shutil.rmtree(shard_dir)


def _first_images(shard_dir: Path, num_batches: int, n: int) -> Iterator[np.ndarray]:
    for arr in _iter_shards(shard_dir, num_batches, "arr_0"):
        if n <= 0:
            return
        yield arr[:n]
        n -= len(arr)


# ----------------------------------------------------------------------------- models


def build_diffusion(args: argparse.Namespace):
    """The sampling diffusion from the flags (validates respacing and the lambda schedule)."""
    return diffusion_from_flags(vars(args))


def measurement_inputs(args: argparse.Namespace, device: torch.device):
    """A measurement script's inputs: this process's data batches (``--data_dir``,
    ``--num_samples``, ``--batch_size``), the loaded UNet and the sampler's name."""
    batches = script_data_share(args, args.batch_size)
    logger.log(f"loading {args.model_path}")
    return batches, load_unet(args, device), "ddim" if args.use_ddim else "ddpm"


def load_unet(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """Build the UNet of the flags, load ``--model_path`` into it (strict), move it to device.

    The model is built without allocating random weights (meta device) and takes the
    checkpoint's tensors directly; a checkpoint that does not fit the flags raises a
    one-line ``CheckpointError`` naming the wrong flags. A class-conditional checkpoint
    with the null class of classifier-free guidance (``num_classes + 1`` label rows) loads
    without ``--class_dropout_prob``.
    """
    flags = {k: getattr(args, k) for k in model_and_diffusion_defaults() if hasattr(args, k)}
    state = read_state_dict(args.model_path)
    label = state.get("label_emb.weight")
    null_class = bool(
        flags.get("class_cond")
        and label is not None
        and label.shape[0] == flags.get("num_classes", 0) + 1
    )
    keys = (
        "channel_mult learn_sigma class_cond use_checkpoint attention_resolutions num_heads "
        "num_head_channels num_heads_upsample use_scale_shift_norm dropout resblock_updown "
        "use_new_attention_order num_classes in_channels"
    ).split()
    with torch.device("meta"):
        model = create_model(
            args.image_size,
            args.num_channels,
            args.num_res_blocks,
            null_class=null_class,
            **{k: flags[k] for k in keys if k in flags},
        )
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    load_checkpoint_into(model, state, flags, path=args.model_path, kind="model", assign=True)
    model.to(device)
    if args.use_fp16:
        model.convert_to_fp16()
    elif getattr(args, "use_bf16", False) and device.type == "cuda":
        model.convert_to_fp16(torch.bfloat16)
    return model.eval()


def sampling_model(
    model: Callable[..., torch.Tensor], unet: torch.nn.Module, args: argparse.Namespace
) -> Callable[..., torch.Tensor]:
    """What the sampler calls: ``model`` (the UNet, possibly on the fast path), with
    classifier-free guidance when ``--guidance_scale`` is not 1.

    Raises ``UserError`` when guidance is asked of a checkpoint without the null class.
    """
    scale = float(getattr(args, "guidance_scale", 1.0))
    if scale == 1.0:
        return model
    if not getattr(unet, "null_class", False):
        raise UserError(
            f"--guidance_scale {scale:g} needs a class-conditional model trained with "
            "--class_dropout_prob > 0 (it has a null class); this checkpoint has none: use "
            "--guidance_scale 1.0"
        )
    return classifier_free_guidance(model, scale, null_class=unet.num_classes)


def load_sampling_model(
    args: argparse.Namespace, device: torch.device
) -> Callable[..., torch.Tensor]:
    """What the sampler calls, for the flags: ``load_unet``, then the fast path
    (``optimize_for_sampling``) and classifier-free guidance (``sampling_model``)."""
    unet = load_unet(args, device)
    return sampling_model(optimize_for_sampling(unet, args, device), unet, args)


def optimize_for_sampling(model: torch.nn.Module, args: argparse.Namespace, device: torch.device):
    """``fast_path.optimize_for_sampling`` for the flags: ``--channels_last``, ``--compile``,
    ``--compile_mode``, and ``--use_bf16`` on a CPU (the trunk in bfloat16; on GPUs
    ``load_unet`` has already converted it). Returns the callable to sample with (float32
    outputs); the weights and the checkpoint format are not changed by the layout."""
    cpu_bf16 = bool(getattr(args, "use_bf16", False)) and device.type == "cpu"
    return fast_path.optimize_for_sampling(
        model,
        device=device,
        channels_last=getattr(args, "channels_last", None),
        compile=bool(getattr(args, "compile", False)),
        compile_mode=getattr(args, "compile_mode", "default"),
        precision="bf16" if cpu_bf16 else "fp32",
    )
