"""Training loops for the diffusion model and the noisy-image classifier.

Checkpoints (in the logger's folder, ``NNNNNN`` = number of optimizer steps taken):

- ``modelNNNNNN.pt``: the float32 parameters as a plain state dict with the official key
  names (loads with ``strict=True`` into the model built from the same flags);
- ``ema_RATE_NNNNNN.pt``: the same for each EMA rate (diffusion model only);
- ``optNNNNNN.pt``: the AdamW state dict;
- ``stateNNNNNN.pt``: what exact resumption needs beyond those: the fp16 loss scale and
  the state of a loss-aware schedule sampler.

Every file is written to a temporary file in the same folder and renamed into place, and
``modelNNNNNN.pt`` is written last: a crash never leaves a truncated file under a final
name, and a model file implies that the other files of its step are complete.

Determinism: all randomness of step ``k`` on rank ``r`` (timesteps, noise, the DDPM-IP
perturbation, dropout) is drawn from generators seeded with ``(seed, r, k)``, so it needs no
saved RNG state. The data stream is a function of its own seed; a resumed run skips the
batches of the steps already taken, so a run resumed from step ``k`` continues exactly like
the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel.distributed import DistributedDataParallel as DDP
from torch.optim import AdamW

from . import dist_util, logger
from .checkpoints import load_checkpoint_into, read_state_dict
from .fp16_util import MixedPrecisionTrainer
from .nn import update_ema
from .resample import LossAwareSampler, UniformSampler

Batch = Tuple[torch.Tensor, Dict[str, torch.Tensor]]

# ------------------------------------------------------------------------------- flags

TRAIN_FLAG_HELP: Dict[str, str] = {
    "data_dir": "training images: an image folder (class = file-name prefix) or an .npz "
    "(arr_0 uint8 NHWC, arr_1 labels)",
    "val_data_dir": "validation images (same formats as data_dir; '' = no evaluation)",
    "schedule_sampler": "timestep sampler: uniform, or loss-second-moment importance sampling",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "lr_anneal_steps": "anneal the learning rate linearly to 0 over this many steps and stop "
    "there (0 = constant learning rate)",
    "batch_size": "images per rank per step (the global batch is batch_size * ranks)",
    "microbatch": "split each batch into chunks of this size, accumulating gradients "
    "(-1 = no split)",
    "ema_rate": "comma-separated EMA decay rates, e.g. 0.9999,0.99 (one ema_RATE_*.pt each)",
    "log_interval": "write the logged means every this many steps",
    "save_interval": "save checkpoints every this many steps",
    "resume_checkpoint": "resume from path/modelNNNNNN.pt (the ema, opt and state files of "
    "step NNNNNN are read from the same folder)",
    "fp16_scale_growth": "growth of log2(loss scale) per good fp16 step",
    "input_perturbation": "DDPM-IP gamma: the network sees x_t built from noise + gamma * xi "
    "while the target stays the noise (0.0 = plain ADM training)",
    "seed": "seed of the model init, the data order and every per-step random draw",
    "log_dir": "folder for logs and checkpoints ('' = $OPENAI_LOGDIR, else a timestamped "
    "folder in the temp dir)",
    "max_steps": "stop when this many steps are done, saving a final checkpoint "
    "(counts the resumed steps; 0 = run forever)",
    "compile": "torch.compile the model (checkpoints keep the plain key names)",
    "channels_last": "keep activations and weights in channels_last memory format",
    "num_workers": "data loader worker processes per rank (0 = load in the training process)",
    "random_flip": "flip each training image horizontally with probability 1/2",
    "noised": "train the classifier on noisy images x_t at random t (else on clean x_0)",
    "iterations": "total classifier training steps",
    "anneal_lr": "anneal the classifier learning rate linearly to 0 over the iterations",
    "eval_interval": "evaluate on val_data_dir every this many steps",
}
TRAIN_FLAG_CHOICES: Dict[str, Sequence[str]] = {
    "schedule_sampler": ("uniform", "loss-second-moment"),
}


def image_train_defaults() -> Dict[str, Any]:
    """Defaults of the training flags of ``image_train.py`` and ``super_res_train.py``.

    The original's defaults, plus ``input_perturbation``, ``seed``, ``log_dir``,
    ``max_steps``, ``compile``, ``channels_last`` and ``num_workers``.
    """
    return dict(
        data_dir="",
        schedule_sampler="uniform",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        batch_size=1,
        microbatch=-1,
        ema_rate="0.9999",
        log_interval=10,
        save_interval=10000,
        resume_checkpoint="",
        fp16_scale_growth=1e-3,
        input_perturbation=0.0,
        seed=0,
        log_dir="",
        max_steps=0,
        compile=False,
        channels_last=False,
        num_workers=1,
        random_flip=True,
    )


def classifier_train_defaults() -> Dict[str, Any]:
    """Defaults of the training flags of ``classifier_train.py`` (the original's, plus
    ``seed``, ``log_dir``, ``num_workers``)."""
    return dict(
        data_dir="",
        val_data_dir="",
        noised=True,
        iterations=150000,
        lr=3e-4,
        weight_decay=0.0,
        anneal_lr=False,
        batch_size=4,
        microbatch=-1,
        schedule_sampler="uniform",
        resume_checkpoint="",
        log_interval=10,
        eval_interval=5,
        save_interval=10000,
        seed=0,
        log_dir="",
        num_workers=1,
    )


def check_train_args(args) -> None:
    """Reject flag values that cannot work, with a one-line ``ValueError``."""
    positive = ["batch_size", "log_interval", "save_interval"]
    positive += [k for k in ("eval_interval", "iterations") if hasattr(args, k)]
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.microbatch == 0 or args.microbatch < -1:
        raise ValueError(f"--microbatch must be -1 or positive, got {args.microbatch}")
    if args.seed < 0:
        raise ValueError(f"--seed must be non-negative, got {args.seed}")
    if not args.data_dir:
        raise ValueError("--data_dir is required (an image folder or an .npz file)")
    if hasattr(args, "ema_rate"):
        parse_ema_rates(args.ema_rate)
    if getattr(args, "input_perturbation", 0.0) < 0:
        raise ValueError(f"--input_perturbation must be >= 0, got {args.input_perturbation}")
    for name in ("max_steps", "lr_anneal_steps"):
        if getattr(args, name, 0) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")


def parse_ema_rates(ema_rate) -> List[float]:
    """``"0.9999,0.99"`` -> ``[0.9999, 0.99]``; every rate must lie in [0, 1)."""
    if isinstance(ema_rate, (float, int)):
        rates = [float(ema_rate)]
    else:
        try:
            rates = [float(x) for x in str(ema_rate).split(",") if x.strip()]
        except ValueError:
            raise ValueError(
                f"invalid --ema_rate {ema_rate!r}: expected e.g. 0.9999,0.99"
            ) from None
    if not rates or any(not 0.0 <= r < 1.0 for r in rates):
        raise ValueError(f"invalid --ema_rate {ema_rate!r}: rates must lie in [0, 1)")
    return rates


def save_flags(args, name: str = "flags.json") -> None:
    """Write every flag of this run as JSON to the log folder (rank 0; atomically)."""
    if dist_util.get_rank() == 0:
        path = os.path.join(logger.get_dir(), name)
        atomic_write_bytes(json.dumps(vars(args), indent=2, sort_keys=True).encode(), path)
    dist_util.barrier()


# ------------------------------------------------------------------------- randomness


def step_seed(seed: int, rank: int, step: int, stream: int = 0) -> int:
    """A 64-bit seed for the random draws of ``step`` on ``rank`` (``stream`` separates uses)."""
    state = np.random.SeedSequence([seed, rank, step, stream]).generate_state(1, np.uint64)
    return int(state[0])


def seed_step(seed: int, step: int, sampler=None) -> None:
    """Seed torch (CPU and CUDA) and the schedule sampler for one training step."""
    rank = dist_util.get_rank()
    torch.manual_seed(step_seed(seed, rank, step))
    if sampler is not None:
        sampler.rng = np.random.default_rng(step_seed(seed, rank, step, stream=1))


def skip_batches(data: Iterator, n: int) -> None:
    """Advance a data stream by ``n`` batches (restores the data order of a resumed run)."""
    if n < 0:
        raise ValueError(f"the data stream starts {-n} batches past the resumed step")
    if n > 0:
        logger.log(f"skipping {n} batches to restore the data order of step {n}...")
    for _ in range(n):
        next(data)


# ------------------------------------------------------------------------- checkpoints


def atomic_write_bytes(payload: bytes, path: str) -> None:
    """Write ``payload`` to ``path`` atomically (temp file in the same folder, then rename)."""
    _atomic_write(path, lambda f: f.write(payload))


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically: the final name holds the old file or the new
    one, never a partial write."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def _atomic_write(path: str, write: Callable) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (not possible everywhere)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def resume_step_of(resume_checkpoint: str) -> int:
    """Steps done before a resume from ``resume_checkpoint`` (0 when not resuming)."""
    return parse_resume_step_from_filename(resume_checkpoint) if resume_checkpoint else 0


def parse_resume_step_from_filename(filename: str) -> int:
    """The step of ``path/to/modelNNNNNN.pt``; raises ``ValueError`` for other names."""
    match = re.fullmatch(r"model(\d+)\.pt", os.path.basename(filename))
    if match is None:
        raise ValueError(f"cannot resume from {filename}: expected a file named modelNNNNNN.pt")
    return int(match.group(1))


def find_ema_checkpoint(main_checkpoint: str, step: int, rate: float) -> Optional[str]:
    """The ``ema_RATE_NNNNNN.pt`` next to ``main_checkpoint``, or None when it is missing."""
    path = os.path.join(os.path.dirname(main_checkpoint), f"ema_{rate}_{step:06d}.pt")
    return path if _exists_everywhere(path) else None


def _sibling(main_checkpoint: str, prefix: str, step: int) -> Optional[str]:
    path = os.path.join(os.path.dirname(main_checkpoint), f"{prefix}{step:06d}.pt")
    return path if _exists_everywhere(path) else None


def _exists_everywhere(path: str) -> bool:
    """Whether ``path`` exists, as seen by rank 0 (every rank calls; all get one answer)."""

    def exists() -> bool:
        if "://" in path:
            import blobfile as bf

            return bool(bf.exists(path))
        return os.path.exists(path)

    return bool(dist_util.on_rank0(exists))


def load_model_checkpoint(model: nn.Module, path: str, kind: str = "model") -> None:
    """Load ``path`` into ``model`` with ``strict=True`` (every rank calls: rank 0 reads and
    broadcasts; ``torch.compile``/DDP key prefixes are stripped). A checkpoint that does not
    fit raises a one-line ``CheckpointError`` (a ``ValueError``)."""
    load_checkpoint_into(model, read_state_dict(path), path=path, kind=kind)


def _cpu_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Plain contiguous CPU tensors (channels_last or device tensors saved like the rest)."""
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}


def save_step_files(files: Dict[str, Any], directory: str) -> None:
    """Rank 0 writes ``{file name: object}`` atomically, in order; every rank then waits (and
    raises if the writing failed)."""

    def write() -> None:
        for name, obj in files.items():
            logger.log(f"saving {name}...")
            atomic_save(obj, os.path.join(directory, name))

    dist_util.on_rank0(write)


# ------------------------------------------------------------------------------ metrics


class DeviceMeans:
    """Running means of per-sample values, kept on the device until the logs are written.

    ``add`` and ``add_by_quartile`` launch a few kernels and never wait for the device;
    ``flush`` sums over ranks (one all-reduce) and hands the means to ``logger.logkv``.
    Every rank must add the same keys.
    """

    def __init__(self) -> None:
        self._sums: Dict[str, torch.Tensor] = {}
        self._counts: Dict[str, torch.Tensor] = {}

    def _accumulate(self, key: str, total: torch.Tensor, count: torch.Tensor) -> None:
        if key in self._sums:
            self._sums[key] += total
            self._counts[key] += count
        else:
            self._sums[key], self._counts[key] = total, count

    def add(self, key: str, values: torch.Tensor) -> None:
        """Add every element of ``values`` to the mean of ``key``."""
        v = values.detach().float().reshape(-1)
        self._accumulate(key, v.sum().reshape(1), v.new_full((1,), v.numel()))

    def add_by_quartile(
        self, key: str, t: torch.Tensor, values: torch.Tensor, num_timesteps: int
    ) -> None:
        """Add to ``key`` and to ``key_q0``..``key_q3`` by the quartile of each sample's t."""
        v = values.detach().float().reshape(-1)
        self.add(key, v)
        quartile = torch.clamp(4 * t // num_timesteps, max=3)
        sums = v.new_zeros(4).index_add_(0, quartile, v)
        counts = v.new_zeros(4).index_add_(0, quartile, torch.ones_like(v))
        self._accumulate(f"{key}_q", sums, counts)

    def flush(self) -> None:
        """Log every mean through ``logger.logkv`` and start over (every rank calls this)."""
        keys = sorted(self._sums)
        if not keys:
            return
        sums = torch.cat([self._sums[k] for k in keys])
        counts = torch.cat([self._counts[k] for k in keys])
        both = torch.stack([sums, counts])  # (2, total entries)
        if dist_util.get_world_size() > 1:
            both = dist_util.all_reduce_mean(both)
        both = both.cpu().numpy()
        offset = 0
        for k in keys:
            n = self._sums[k].numel()
            s, c = both[0, offset : offset + n], both[1, offset : offset + n]
            offset += n
            if n == 1:
                logger.logkv(k, float(s[0] / c[0]))
            else:
                for i in range(n):
                    if c[i] > 0:
                        logger.logkv(f"{k}{i}", float(s[i] / c[i]))
        self._sums.clear()
        self._counts.clear()


def log_loss_dict(
    metrics: DeviceMeans, diffusion, ts: torch.Tensor, losses: Dict[str, torch.Tensor]
) -> None:
    """Log each loss term's mean, overall and by quartile of t (keys ``loss``, ``loss_q0``..)."""
    for key, values in losses.items():
        metrics.add_by_quartile(key, ts, values, diffusion.num_timesteps)


# ---------------------------------------------------------------------- diffusion loop


class TrainLoop:
    """The training loop of the diffusion model (ADM; DDPM-IP with ``input_perturbation``).

    :param data: iterator of ``(batch [N, C, H, W] in [-1, 1], model kwargs)``, positioned
        at step 0: a resumed run skips the batches of its first ``resume_step`` steps.
    :param batch_size: images per rank per step; ``microbatch`` splits them (-1: no split).
        The gradient is the mean over the whole batch whatever the split.
    :param ema_rate: a float, or comma-separated rates like ``"0.9999,0.99"``.
    :param use_fp16: fp16 trunk weights, fp32 master params and dynamic loss scaling.
    :param use_bf16: bfloat16 autocast of the forward pass with fp32 weights (no scaling).
    :param seed: seeds every random draw of a step as a function of (seed, rank, step).
    :param max_steps: stop (and save) when this many steps are done; 0 = no limit.
    :param compile: ``torch.compile`` the model; ``channels_last``: channels_last memory.
    :param checkpoint_dir: where checkpoints go (default: the logger's folder).
    :param data_start_batch: the batch of the stream that ``data`` starts at (e.g.
        ``load_data(start_batch=resume_step)``); the loop skips only the rest.
    :param class_dropout_prob: replace each label by the model's null class (index
        ``num_classes``) with this probability (classifier-free guidance; Ho & Salimans 2021).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        diffusion,
        data: Iterator[Batch],
        batch_size: int,
        microbatch: int,
        lr: float,
        ema_rate,
        log_interval: int,
        save_interval: int,
        resume_checkpoint: str,
        use_fp16: bool = False,
        fp16_scale_growth: float = 1e-3,
        schedule_sampler=None,
        weight_decay: float = 0.0,
        lr_anneal_steps: int = 0,
        input_perturbation: float = 0.0,
        seed: int = 0,
        max_steps: int = 0,
        use_bf16: bool = False,
        compile: bool = False,
        channels_last: bool = False,
        checkpoint_dir: Optional[str] = None,
        data_start_batch: int = 0,
        class_dropout_prob: float = 0.0,
    ) -> None:
        if use_fp16 and use_bf16:
            raise ValueError("use_fp16 and use_bf16 are exclusive: pick one half precision")
        if class_dropout_prob > 0 and not getattr(model, "null_class", False):
            raise ValueError(
                "class_dropout_prob > 0 needs a model with a null class (built with "
                "--class_dropout_prob > 0)"
            )
        self.class_dropout_prob = class_dropout_prob
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rate = parse_ema_rates(ema_rate)
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.resume_checkpoint = resume_checkpoint
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        self.fp16_scale_growth = fp16_scale_growth
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion, seed=seed)
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.input_perturbation = input_perturbation
        self.seed = seed
        self.max_steps = max_steps
        self.channels_last = channels_last
        self.checkpoint_dir = checkpoint_dir
        self.data_start_batch = data_start_batch

        self.step = 0  # steps taken in this run
        self.resume_step = 0  # steps taken before it (from the checkpoint's name)
        self.global_batch = self.batch_size * dist_util.get_world_size()
        self.metrics = DeviceMeans()
        self._data_positioned = False

        self._load_and_sync_parameters()
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.mp_trainer = MixedPrecisionTrainer(
            model=self.model, use_fp16=use_fp16, fp16_scale_growth=fp16_scale_growth
        )
        device = dist_util.dev()
        self.opt = AdamW(
            self.mp_trainer.master_params,
            lr=self.lr,
            weight_decay=self.weight_decay,
            fused=device.type == "cuda",  # one kernel per step; the same state dict
        )
        if self.resume_step:
            self._load_optimizer_state()
            self.ema_params = [self._load_ema_parameters(rate) for rate in self.ema_rate]
            self._load_train_state()
        else:
            self.ema_params = [self._copy_master_params() for _ in self.ema_rate]

        self.use_ddp = dist_util.get_world_size() > 1
        wrapped: nn.Module = self.model
        if self.use_ddp:
            wrapped = DDP(
                self.model,
                device_ids=[device] if device.type == "cuda" else None,
                broadcast_buffers=False,
                bucket_cap_mb=128,
                find_unused_parameters=False,
            )
        self.ddp_model = torch.compile(wrapped) if compile else wrapped

    # ----------------------------------------------------------------- resume

    def _load_and_sync_parameters(self) -> None:
        if self.resume_checkpoint:
            self.resume_step = parse_resume_step_from_filename(self.resume_checkpoint)
            logger.log(f"loading model from checkpoint: {self.resume_checkpoint}...")
            load_model_checkpoint(self.model, self.resume_checkpoint)
        dist_util.sync_params(self.model.parameters())
        dist_util.sync_params(self.model.buffers())

    def _copy_master_params(self) -> List[torch.Tensor]:
        return [p.detach().clone() for p in self.mp_trainer.master_params]

    def _load_ema_parameters(self, rate: float) -> List[torch.Tensor]:
        path = find_ema_checkpoint(self.resume_checkpoint, self.resume_step, rate)
        if path is None:
            logger.warn(f"no EMA checkpoint for rate {rate}: the EMA restarts from the model")
            return self._copy_master_params()
        logger.log(f"loading EMA from checkpoint: {path}...")
        state_dict = read_state_dict(path)
        device = self.mp_trainer.master_params[0].device
        return [
            p.detach().to(device).float()
            for p in self.mp_trainer.state_dict_to_master_params(state_dict)
        ]

    def _load_optimizer_state(self) -> None:
        path = _sibling(self.resume_checkpoint, "opt", self.resume_step)
        if path is None:
            logger.warn(f"no opt{self.resume_step:06d}.pt: the optimizer state starts afresh")
            return
        logger.log(f"loading optimizer state from checkpoint: {path}...")
        state_dict = dist_util.load_state_dict(path, map_location=dist_util.dev())
        try:
            self.opt.load_state_dict(state_dict)
        except ValueError as e:
            raise ValueError(
                f"{path} does not fit this optimizer (was --use_fp16 the same?): {e}"
            ) from None

    def _load_train_state(self) -> None:
        path = _sibling(self.resume_checkpoint, "state", self.resume_step)
        if path is None:
            logger.warn(f"no state{self.resume_step:06d}.pt: loss scale and sampler start afresh")
            return
        state = dist_util.load_state_dict(path, map_location="cpu")
        self.mp_trainer.lg_loss_scale = float(state["lg_loss_scale"])
        self.schedule_sampler.load_state_dict(state["schedule_sampler"])

    # ------------------------------------------------------------------ loop

    @property
    def global_step(self) -> int:
        """Optimizer steps taken, counting those before the resume."""
        return self.step + self.resume_step

    def _done(self) -> bool:
        s = self.global_step
        return bool(
            (self.lr_anneal_steps and s >= self.lr_anneal_steps)
            or (self.max_steps and s >= self.max_steps)
        )

    def run_loop(self) -> None:
        """Train until ``lr_anneal_steps`` / ``max_steps`` (forever if both are 0)."""
        if not self._data_positioned:
            skip_batches(self.data, self.resume_step - self.data_start_batch)
            self._data_positioned = True
        last_saved = self.global_step
        while not self._done():
            batch, cond = next(self.data)
            self.run_step(batch, cond)
            if self.global_step % self.log_interval == 0:
                self.log_step()
                logger.dumpkvs()
            if self.global_step % self.save_interval == 0:
                self.save()
                last_saved = self.global_step
        if self.global_step != last_saved:
            self.save()

    def run_step(self, batch: torch.Tensor, cond: Dict[str, torch.Tensor]) -> None:
        """One optimizer step on one batch (and the EMA update when the step was taken)."""
        self._anneal_lr()
        self.forward_backward(batch, cond)
        took_step = self.mp_trainer.optimize(self.opt)
        if took_step:
            self._update_ema()
            self.metrics.add("grad_norm", self.mp_trainer.grad_norm)
            self.metrics.add("param_norm", self.mp_trainer.param_norm)
        if self.use_fp16:
            logger.logkv_mean("lg_loss_scale", self.mp_trainer.lg_loss_scale)
        self.step += 1

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(dist_util.dev(), non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _model_fn(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        if not self.use_bf16:
            return self.ddp_model(x, t, **kwargs)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            out = self.ddp_model(x, t, **kwargs)
        return out.float()

    def forward_backward(self, batch: torch.Tensor, cond: Dict[str, torch.Tensor]) -> None:
        """Accumulate the gradient of the batch's mean (importance-weighted) loss."""
        self.mp_trainer.zero_grad()
        batch = self._to_device(batch)
        cond = {k: self._to_device(v) for k, v in cond.items()}
        n = batch.shape[0]
        # Every random draw of this step comes from (seed, rank, step): nothing to save.
        seed_step(self.seed, self.global_step, self.schedule_sampler)
        t, weights = self.schedule_sampler.sample(n, batch.device)  # (N,), (N,)
        noise = torch.randn(batch.shape, device=batch.device)
        xi = torch.randn(batch.shape, device=batch.device) if self.input_perturbation else None
        if self.class_dropout_prob > 0 and "y" in cond:
            drop = torch.rand(n, device=batch.device) < self.class_dropout_prob  # (N,)
            cond["y"] = torch.where(drop, self.model.num_classes, cond["y"])
        for i in range(0, n, self.microbatch):
            sl = slice(i, i + self.microbatch)
            last = i + self.microbatch >= n
            sync_ctx = (
                self.ddp_model.no_sync() if self.use_ddp and not last else contextlib.nullcontext()
            )
            with sync_ctx:
                losses = self.diffusion.training_losses(
                    self._model_fn,
                    batch[sl],
                    t[sl],
                    model_kwargs={k: v[sl] for k, v in cond.items()},
                    noise=noise[sl],
                    input_perturbation=self.input_perturbation,
                    xi=None if xi is None else xi[sl],
                )
                if isinstance(self.schedule_sampler, LossAwareSampler):
                    self.schedule_sampler.update_with_local_losses(t[sl], losses["loss"].detach())
                loss = (losses["loss"] * weights[sl]).sum() / n
                self.mp_trainer.backward(loss)
            log_loss_dict(
                self.metrics, self.diffusion, t[sl], {k: v * weights[sl] for k, v in losses.items()}
            )

    def _update_ema(self) -> None:
        for rate, params in zip(self.ema_rate, self.ema_params):
            update_ema(params, self.mp_trainer.master_params, rate=rate)

    def _anneal_lr(self) -> None:
        """lr of step k (0-based) = lr * (1 - k / lr_anneal_steps)."""
        if not self.lr_anneal_steps:
            return
        frac_done = self.global_step / self.lr_anneal_steps
        lr = self.lr * (1 - frac_done)
        for param_group in self.opt.param_groups:
            param_group["lr"] = lr

    def log_step(self) -> None:
        """Hand this interval's means and the step counters to the logger."""
        self.metrics.flush()
        logger.logkv("step", self.global_step)
        logger.logkv("samples", self.global_step * self.global_batch)
        logger.logkv("lr", self.opt.param_groups[0]["lr"])

    # ------------------------------------------------------------------ save

    def save(self) -> None:
        """Write the ema, opt, state and model files of this step (model last, atomically)."""
        step = self.global_step
        files: Dict[str, Any] = {}
        for rate, params in zip(self.ema_rate, self.ema_params):
            files[f"ema_{rate}_{step:06d}.pt"] = _cpu_state_dict(
                self.mp_trainer.master_params_to_state_dict(params)
            )
        files[f"opt{step:06d}.pt"] = self.opt.state_dict()
        files[f"state{step:06d}.pt"] = {
            "step": step,
            "lg_loss_scale": float(self.mp_trainer.lg_loss_scale),
            "schedule_sampler": self.schedule_sampler.state_dict(),
        }
        files[f"model{step:06d}.pt"] = _cpu_state_dict(
            self.mp_trainer.master_params_to_state_dict(self.mp_trainer.master_params)
        )
        save_step_files(files, self.checkpoint_dir or get_blob_logdir())


def get_blob_logdir() -> str:
    """The folder checkpoints are written to: the logger's."""
    return logger.get_dir()


# ----------------------------------------------------------------------- super-resolution


def superres_batches(data: Iterator[Batch], small_size: int) -> Iterator[Batch]:
    """Add ``low_res`` (the batch area-downsampled to ``small_size``) to the model kwargs."""
    for large_batch, model_kwargs in data:
        model_kwargs = dict(model_kwargs)
        model_kwargs["low_res"] = F.interpolate(large_batch, small_size, mode="area")
        yield large_batch, model_kwargs


def read_base_samples(
    path: str, small_size: int, class_cond: bool
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The low-resolution inputs of ``super_res_sample.py``: (uint8 [N, s, s, 3], labels).

    Raises ``ValueError`` (one line) for a missing or malformed file or a wrong size.
    """
    from .image_datasets import read_npz

    if not os.path.exists(path):
        raise FileNotFoundError(f"--base_samples not found: {path}")
    images, labels = read_npz(path)
    if images.shape[1:3] != (small_size, small_size):
        raise ValueError(
            f"{path}: images are {images.shape[1]}x{images.shape[2]}, but --small_size is "
            f"{small_size}"
        )
    if class_cond and labels is None:
        raise ValueError(f"{path}: a class-conditional model needs labels (arr_1)")
    return images, (labels if class_cond else None)


def load_sr_model(args, device: torch.device):
    """The super-resolution model of the flags with ``args.model_path`` loaded (strict),
    on ``device``, in eval mode and the precision of ``use_fp16``/``use_bf16``; and its
    diffusion."""
    from .script_util import sr_create_model_and_diffusion, sr_model_and_diffusion_defaults

    flags = {k: getattr(args, k) for k in sr_model_and_diffusion_defaults()}
    use_bf16 = flags.pop("use_bf16")
    use_fp16 = flags.pop("use_fp16")
    model, diffusion = sr_create_model_and_diffusion(**flags, use_fp16=False)
    load_model_checkpoint(model, args.model_path)
    model.to(device)
    if use_fp16:
        model.convert_to_fp16()
    elif use_bf16:
        model.convert_to_fp16(torch.bfloat16)
    return model.eval(), diffusion


def super_resolve(
    model: nn.Module,
    diffusion,
    images: np.ndarray,
    labels: Optional[np.ndarray],
    *,
    num_samples: int,
    batch_size: int,
    large_size: int,
    clip_denoised: bool = True,
    use_ddim: bool = False,
    seed: int = 0,
) -> Optional[np.ndarray]:
    """Upsample ``num_samples`` low-resolution images (cycled in order) over all ranks.

    Global batch ``j`` (rank ``j % world``) takes images ``j * batch_size ...`` and draws its
    noise from a generator seeded by ``(seed, j)``, so the output does not depend on the
    number of ranks. Returns uint8 [num_samples, large, large, 3] on rank 0, None elsewhere.
    """
    from .sample_util import batch_seed, to_uint8_nhwc

    device = dist_util.dev()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    num_batches = -(-num_samples // batch_size)
    done: List[Tuple[int, np.ndarray]] = []
    for j in range(rank, num_batches, world):
        n = min(batch_size, num_samples - j * batch_size)
        idx = (j * batch_size + np.arange(n)) % len(images)
        low_res = torch.from_numpy(images[idx]).float().permute(0, 3, 1, 2) / 127.5 - 1
        model_kwargs = {"low_res": low_res.to(device)}  # (n, 3, small, small)
        if labels is not None:
            model_kwargs["y"] = torch.from_numpy(labels[idx]).to(device)
        generator = torch.Generator(device=device)
        generator.manual_seed(batch_seed(seed, j))
        sample = loop(
            model,
            (n, 3, large_size, large_size),
            clip_denoised=clip_denoised,
            model_kwargs=model_kwargs,
            device=device,
            generator=generator,
        )
        done.append((j, to_uint8_nhwc(sample).cpu().numpy()))
        logger.log(f"upsampled batch {j + 1} of {num_batches}")
    gathered = dist_util.all_gather_object(done)
    if rank != 0:
        return None
    batches = sorted((item for rank_items in gathered for item in rank_items), key=lambda x: x[0])
    return np.concatenate([arr for _, arr in batches], axis=0)


# ------------------------------------------------------------------ classifier loop


def compute_top_k(
    logits: torch.Tensor, labels: torch.Tensor, k: int, reduction: str = "mean"
) -> torch.Tensor:
    """Top-k accuracy: per sample (``reduction="none"``) or its mean."""
    k = min(k, logits.shape[-1])
    top_ks = torch.topk(logits, k, dim=-1).indices  # (N, k)
    hits = (top_ks == labels[:, None]).any(dim=-1).float()
    return hits.mean() if reduction == "mean" else hits


def split_microbatches(microbatch: int, *args: torch.Tensor):
    """Yield aligned chunks of ``microbatch`` rows of each tensor (-1: one chunk)."""
    bs = len(args[0])
    if microbatch == -1 or microbatch >= bs:
        yield tuple(args)
    else:
        for i in range(0, bs, microbatch):
            yield tuple(x[i : i + microbatch] for x in args)


def set_annealed_lr(opt: torch.optim.Optimizer, base_lr: float, frac_done: float) -> None:
    """lr = base_lr * (1 - frac_done) for every parameter group."""
    lr = base_lr * (1 - frac_done)
    for param_group in opt.param_groups:
        param_group["lr"] = lr


class ClassifierTrainLoop:
    """Training of the noisy-image classifier (cross-entropy on x_t at random t).

    Checkpoints ``modelNNNNNN.pt`` (float32, official keys) and ``optNNNNNN.pt`` are saved
    every ``save_interval`` steps and at the end, like the original; ``resume_checkpoint``
    restores both on every rank. Validation (``val_data``) is evaluated every
    ``eval_interval`` steps and logged as ``val_loss``, ``val_acc@1``, ``val_acc@5``.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        diffusion,
        data: Iterator[Batch],
        val_data: Optional[Iterator[Batch]],
        noised: bool,
        iterations: int,
        lr: float,
        weight_decay: float,
        anneal_lr: bool,
        batch_size: int,
        microbatch: int,
        schedule_sampler,
        resume_checkpoint: str,
        log_interval: int,
        eval_interval: int,
        save_interval: int,
        use_fp16: bool = False,
        seed: int = 0,
        checkpoint_dir: Optional[str] = None,
        data_start_batch: int = 0,
    ) -> None:
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.val_data = val_data
        self.noised = noised
        self.iterations = iterations
        self.lr = lr
        self.anneal_lr = anneal_lr
        self.batch_size = batch_size
        self.microbatch = microbatch
        self.schedule_sampler = schedule_sampler
        self.log_interval = log_interval
        self.eval_interval = eval_interval
        self.save_interval = save_interval
        self.seed = seed
        self.checkpoint_dir = checkpoint_dir
        self.data_start_batch = data_start_batch
        self.metrics = DeviceMeans()

        self.resume_step = 0
        if resume_checkpoint:
            self.resume_step = parse_resume_step_from_filename(resume_checkpoint)
            logger.log(f"loading model from checkpoint: {resume_checkpoint}...")
            load_model_checkpoint(model, resume_checkpoint, kind="classifier")
        dist_util.sync_params(model.parameters())
        self.mp_trainer = MixedPrecisionTrainer(
            model=model, use_fp16=use_fp16, initial_lg_loss_scale=16.0
        )
        self.use_ddp = dist_util.get_world_size() > 1
        device = dist_util.dev()
        self.ddp_model = (
            DDP(
                model,
                device_ids=[device] if device.type == "cuda" else None,
                broadcast_buffers=False,
                bucket_cap_mb=128,
                find_unused_parameters=False,
            )
            if self.use_ddp
            else model
        )
        self.opt = AdamW(self.mp_trainer.master_params, lr=lr, weight_decay=weight_decay)
        if resume_checkpoint:
            path = _sibling(resume_checkpoint, "opt", self.resume_step)
            if path is None:
                logger.warn(f"no opt{self.resume_step:06d}.pt: the optimizer state starts afresh")
            else:
                logger.log(f"loading optimizer state from checkpoint: {path}...")
                self.opt.load_state_dict(dist_util.load_state_dict(path, map_location=device))

    def forward_backward_log(self, data: Iterator[Batch], prefix: str = "train") -> None:
        """Loss, acc@1 and acc@5 of one batch, logged under ``prefix``; gradients when
        grad mode is on."""
        batch, extra = next(data)
        labels = extra["y"].to(dist_util.dev())
        batch = batch.to(dist_util.dev())
        if self.noised:
            t, _ = self.schedule_sampler.sample(batch.shape[0], batch.device)
            batch = self.diffusion.q_sample(batch, t)
        else:
            t = torch.zeros(batch.shape[0], dtype=torch.long, device=batch.device)
        chunks = list(split_microbatches(self.microbatch, batch, labels, t))
        for i, (sub_batch, sub_labels, sub_t) in enumerate(chunks):
            last = i == len(chunks) - 1
            sync_ctx = (
                self.ddp_model.no_sync()
                if self.use_ddp and not last and torch.is_grad_enabled()
                else contextlib.nullcontext()
            )
            with sync_ctx:
                logits = self.ddp_model(sub_batch, timesteps=sub_t)
                loss = F.cross_entropy(logits.float(), sub_labels, reduction="none")
                if loss.requires_grad:
                    self.mp_trainer.backward(loss.mean() * len(sub_batch) / len(batch))
            losses = {
                f"{prefix}_loss": loss.detach(),
                f"{prefix}_acc@1": compute_top_k(logits, sub_labels, k=1, reduction="none"),
                f"{prefix}_acc@5": compute_top_k(logits, sub_labels, k=5, reduction="none"),
            }
            log_loss_dict(self.metrics, self.diffusion, sub_t, losses)

    def run_loop(self) -> None:
        """Train until ``iterations`` steps are done, then save."""
        skip_batches(self.data, self.resume_step - self.data_start_batch)
        if self.val_data is not None:
            skip_batches(self.val_data, self.resume_step // self.eval_interval)
        step = self.resume_step
        while step < self.iterations:
            if self.anneal_lr:
                set_annealed_lr(self.opt, self.lr, step / self.iterations)
            seed_step(self.seed, step, self.schedule_sampler)
            self.mp_trainer.zero_grad()
            self.forward_backward_log(self.data)
            if self.mp_trainer.optimize(self.opt):
                self.metrics.add("grad_norm", self.mp_trainer.grad_norm)
                self.metrics.add("param_norm", self.mp_trainer.param_norm)
            step += 1
            if self.val_data is not None and step % self.eval_interval == 0:
                self.model.eval()
                with torch.no_grad():
                    self.forward_backward_log(self.val_data, prefix="val")
                self.model.train()
            if step % self.log_interval == 0:
                self.metrics.flush()
                logger.logkv("step", step)
                logger.logkv("samples", step * self.batch_size * dist_util.get_world_size())
                logger.dumpkvs()
            if step % self.save_interval == 0 or step == self.iterations:
                self.save(step)

    def save(self, step: int) -> None:
        """Write ``optNNNNNN.pt`` then ``modelNNNNNN.pt`` atomically (rank 0)."""
        state_dict = self.mp_trainer.master_params_to_state_dict(self.mp_trainer.master_params)
        files = {
            f"opt{step:06d}.pt": self.opt.state_dict(),
            f"model{step:06d}.pt": _cpu_state_dict(state_dict),
        }
        save_step_files(files, self.checkpoint_dir or get_blob_logdir())


# ---------------------------------------------------------------------------- likelihood


def run_bpd_evaluation(
    model: Callable,
    diffusion,
    data: Iterator[Batch],
    num_samples: int,
    clip_denoised: bool = True,
    seed: int = 0,
) -> Dict[str, np.ndarray]:
    """Bits per dimension of the data under the model (``calc_bpd_loop``), over all ranks.

    Whole batches are evaluated until at least ``num_samples`` images (over all ranks) are
    done. Returns ``bpd`` (mean total bits/dim) and the mean per-step terms ``vb``, ``mse``,
    ``xstart_mse`` (each (T,), noisiest step first).
    """
    device = dist_util.dev()
    generator = torch.Generator(device=device)
    generator.manual_seed(step_seed(seed, dist_util.get_rank(), 0))
    world = dist_util.get_world_size()
    all_bpd: List[float] = []
    all_metrics: Dict[str, List[np.ndarray]] = {"vb": [], "mse": [], "xstart_mse": []}
    num_complete = 0
    while num_complete < num_samples:
        batch, model_kwargs = next(data)
        batch = batch.to(device)
        model_kwargs = {k: v.to(device) for k, v in model_kwargs.items()}
        metrics = diffusion.calc_bpd_loop(
            model,
            batch,
            clip_denoised=clip_denoised,
            model_kwargs=model_kwargs,
            generator=generator,
        )
        # means over this batch, then over ranks (every rank holds the same batch size)
        terms = torch.cat(
            [metrics[k].mean(dim=0) for k in all_metrics] + [metrics["total_bpd"].mean()[None]]
        )
        if world > 1:
            terms = dist_util.all_reduce_mean(terms)
        steps = metrics["vb"].shape[1]
        pieces = torch.split(terms.cpu(), [steps, steps, steps, 1])
        for key, piece in zip(all_metrics, pieces):
            all_metrics[key].append(piece.numpy())
        all_bpd.append(float(pieces[-1][0]))
        num_complete += world * batch.shape[0]
        logger.log(f"done {num_complete} samples: bpd={np.mean(all_bpd):.6f}")
    out = {k: np.mean(np.stack(v), axis=0) for k, v in all_metrics.items()}
    out["bpd"] = np.float64(np.mean(all_bpd))
    return out
