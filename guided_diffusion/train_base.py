"""What the two training loops of ``train_util`` share: the files of a run, where a run
starts, and the loop machinery (DDP, resuming on every rank, per-step seeds, logged means,
the log/save/preemption points of the loop).

Checkpoints (in ``--log_dir``; ``NNNNNN`` = number of optimizer steps taken):

- ``modelNNNNNN.pt``: the float32 parameters as a plain state dict with the official key
  names (loads with ``strict=True`` into the model built from the same flags);
- ``ema_RATE_NNNNNN.pt``: the same for each EMA rate (diffusion model only);
- ``optNNNNNN.pt``: the AdamW state dict;
- ``stateNNNNNN.pt``: what exact resumption needs beyond those (diffusion model only): the
  fp16 loss scale and the state of a loss-aware schedule sampler.

Every file is written atomically (``io_util``) with the user's umask, and
``modelNNNNNN.pt`` is written last: a model file implies that the other files of its step
are complete.

A folder is never overwritten by another run. ``flags.json`` records the flags of the run
that started in the folder; a run continued with other flags records them beside it in
``flags_resume_NNNNNN.json`` (NNNNNN: the step it continued from). :func:`prepare_run`
decides, before anything is written, where a run starts: the given
``--resume_checkpoint``, the folder's latest checkpoint when its flags match (the rerun of
an interrupted command), or step 0 in a folder holding no checkpoint; anything else is
refused in one line naming the flags that differ and the fixes.

Determinism: all randomness of step ``k`` on rank ``r`` (timesteps, noise, the DDPM-IP
perturbation, dropout) is drawn from generators seeded with
``seeding.step_seed(seed, r, k)``, so it needs no saved RNG state. The data stream is a
function of its own seed; a resumed run skips the batches of the steps already taken, so a
run resumed from step ``k`` continues exactly like the uninterrupted run.

Preemption: after a SIGTERM (``cli.stop_requested``) the loop saves the current step and
raises ``cli.Preempted``; with several processes the ranks agree on it every
``STOP_CHECK_INTERVAL`` steps (one all-reduce of one number), so all stop at the same step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import warnings
from abc import ABC, abstractmethod
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel.distributed import DistributedDataParallel as DDP
from torch.optim import AdamW

from . import dist_util, logger
from .checkpoints import load_checkpoint_into, read_state_dict
from .cli import Preempted, UserError, stop_requested
from .flags import FLAGS
from .fp16_util import MixedPrecisionTrainer
from .io_util import atomic_save, atomic_write_bytes
from .seeding import step_seed

Batch = Tuple[torch.Tensor, Dict[str, torch.Tensor]]
STOP_CHECK_INTERVAL = 10  # steps between the ranks' agreement on a SIGTERM (several ranks)
# Flags that do not change what a run computes: a rerun may change them and still resume.
RESUME_IGNORED_FLAGS = (
    "log_dir",
    "resume_checkpoint",
    "max_steps",
    "log_interval",
    "save_interval",
    "eval_interval",
    "num_workers",
    "progress",
    "compile",
    "channels_last",
)
_MODEL_FILE = re.compile(r"model(\d+)\.pt")
_FLAGS_FILE = re.compile(r"flags(?:_resume_(\d+))?\.json")


# ----------------------------------------------------------------------------- names


def parse_resume_step_from_filename(filename: str) -> int:
    """The step of ``path/to/modelNNNNNN.pt``; raises ``ValueError`` for other names."""
    match = _MODEL_FILE.fullmatch(os.path.basename(filename))
    if match is None:
        raise ValueError(f"cannot resume from {filename}: expected a file named modelNNNNNN.pt")
    return int(match.group(1))


def resume_step_of(resume_checkpoint: str) -> int:
    """Steps done before a resume from ``resume_checkpoint`` (0 when not resuming)."""
    return parse_resume_step_from_filename(resume_checkpoint) if resume_checkpoint else 0


def latest_checkpoint(log_dir: str) -> Optional[str]:
    """The ``modelNNNNNN.pt`` of ``log_dir`` with the largest step, or None (local folders)."""
    if not os.path.isdir(log_dir):
        return None
    steps = [int(m.group(1)) for m in map(_MODEL_FILE.fullmatch, os.listdir(log_dir)) if m]
    return os.path.join(log_dir, f"model{max(steps):06d}.pt") if steps else None


def find_resume_checkpoint(log_dir: Optional[str] = None) -> Optional[str]:
    """guided-diffusion's hook: override it to discover checkpoints on your infrastructure.

    Called without an argument (as the original), it returns None, and the training loops
    use their ``resume_checkpoint``; ``find_resume_checkpoint(log_dir)`` returns the latest
    ``modelNNNNNN.pt`` in ``log_dir`` (or None).
    """
    return None if log_dir is None else latest_checkpoint(log_dir)


def sibling_checkpoint(main_checkpoint: str, prefix: str, step: int) -> Optional[str]:
    """``{prefix}NNNNNN.pt`` next to ``main_checkpoint``, or None when it is missing."""
    path = os.path.join(os.path.dirname(main_checkpoint), f"{prefix}{step:06d}.pt")
    return path if _exists_everywhere(path) else None


def find_ema_checkpoint(main_checkpoint: str, step: int, rate: float) -> Optional[str]:
    """The ``ema_RATE_NNNNNN.pt`` next to ``main_checkpoint``, or None when it is missing."""
    return sibling_checkpoint(main_checkpoint, f"ema_{rate}_", step)


def _exists_everywhere(path: str) -> bool:
    """Whether ``path`` exists, as seen by rank 0 (every rank calls; all get one answer)."""

    def exists() -> bool:
        if "://" in path:
            import blobfile as bf

            return bool(bf.exists(path))
        return os.path.exists(path)

    return bool(dist_util.on_rank0(exists))


# ----------------------------------------------------------------------------- load, save


def load_model_checkpoint(model: nn.Module, path: str, kind: str = "model") -> None:
    """Load ``path`` into ``model`` with ``strict=True`` (every rank calls: rank 0 reads and
    broadcasts; ``torch.compile``/DDP key prefixes are stripped). A checkpoint that does not
    fit raises a one-line ``CheckpointError`` (a ``ValueError``)."""
    load_checkpoint_into(model, read_state_dict(path), path=path, kind=kind)


def cpu_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Plain contiguous CPU tensors (channels_last or device tensors saved like the rest)."""
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}


def save_step_files(files: Mapping[str, Any], directory: str) -> None:
    """Rank 0 writes ``{file name: object}`` atomically, in order; every rank then waits (and
    raises if the writing failed)."""

    def write() -> None:
        for name, obj in files.items():
            logger.log(f"saving {name}...")
            atomic_save(obj, os.path.join(directory, name))

    dist_util.on_rank0(write)


# ----------------------------------------------------------------------------- the run


def flag_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    """``--name OLD there, NEW now`` for each flag that changes the run (not in
    ``RESUME_IGNORED_FLAGS``). A flag the old record lacks counts at its table default;
    flags the old record has but this version does not are ignored."""
    out = []
    for k in sorted(set(new) - set(RESUME_IGNORED_FLAGS)):
        before = old[k] if k in old else getattr(FLAGS.get(k), "default", None)
        if before != new[k]:
            out.append(f"--{k} {before!r} there, {new[k]!r} now")
    return out


def _latest_flags(log_dir: str) -> Optional[Tuple[int, Dict[str, Any]]]:
    """(step, flags) of the newest flags record in ``log_dir``: ``flags.json`` (step 0) or
    the ``flags_resume_NNNNNN.json`` with the largest step; None when there is none."""
    records = {}
    for name in os.listdir(log_dir) if os.path.isdir(log_dir) else ():
        m = _FLAGS_FILE.fullmatch(name)
        if m:
            records[int(m.group(1) or 0)] = name
    if not records:
        return None
    step = max(records)
    with open(os.path.join(log_dir, records[step])) as f:
        return step, json.load(f)


def _decide_start(flags: Dict[str, Any]) -> Tuple[str, str]:
    """Rank 0: (checkpoint to resume from or '', what to log); ``UserError`` to refuse."""
    log_dir, given = flags["log_dir"], flags["resume_checkpoint"]
    latest = latest_checkpoint(log_dir)
    record = _latest_flags(log_dir)
    differences = flag_differences(record[1], flags) if record else []
    shown = "; ".join(differences[:4]) + (
        f"; +{len(differences) - 4} more" if differences[4:] else ""
    )
    if latest and (not given or resume_step_of(given) < resume_step_of(latest)):
        if record and not differences:
            past = f", past --resume_checkpoint {given}" if given else ""
            return latest, f"resuming from {latest} (the latest checkpoint of this run{past})"
        if given:
            raise UserError(
                f"--log_dir {log_dir} already holds {os.path.basename(latest)}, beyond "
                f"--resume_checkpoint {given}: resuming would overwrite it; use a new --log_dir"
            )
        if record is None:
            raise UserError(
                f"--log_dir {log_dir} holds checkpoints (latest {latest}) but no flags.json: pass "
                f"--resume_checkpoint {latest} to continue from it, or use a new --log_dir"
            )
        raise UserError(
            f"--log_dir {log_dir} holds a run with other flags ({shown}): pass --resume_checkpoint "
            f"{latest} to continue it with the new flags, or use a new --log_dir"
        )
    if not latest and not given and differences:
        raise UserError(
            f"--log_dir {log_dir} holds a run with other flags ({shown}) that saved no checkpoint: "
            "use a new --log_dir, or its flags to restart it"
        )
    return given, f"resuming from {given}" if given else ""


def prepare_run(args: argparse.Namespace) -> str:
    """Check the training flags that are not ranges, and decide where the run starts.

    Returns the checkpoint to resume from ('' = step 0): ``--resume_checkpoint`` if given,
    else the latest ``modelNNNNNN.pt`` in ``--log_dir`` when the folder's flags record
    matches these flags (up to ``RESUME_IGNORED_FLAGS``). Raises ``UserError`` (one line,
    on every rank) when the run would overwrite another run's files. Writes nothing.
    """
    if not args.data_dir:
        raise UserError("--data_dir is required (an image folder or an .npz file)")
    if args.microbatch == 0:
        raise UserError("--microbatch must be -1 (no split) or positive, got 0")
    if hasattr(args, "ema_rate"):
        parse_ema_rates(args.ema_rate)
    if args.resume_checkpoint:
        parse_resume_step_from_filename(args.resume_checkpoint)
    resume, message = dist_util.on_rank0(_decide_start, dict(vars(args)))
    if message:
        logger.log(message)
    return resume


def save_flags(args: argparse.Namespace, name: Optional[str] = None) -> None:
    """Record this run's flags as JSON in the log folder (rank 0; atomically; every rank calls).

    Without ``name``: ``flags.json`` when the folder has no flags record yet, else
    ``flags_resume_NNNNNN.json`` (NNNNNN: the step resumed from) when the flags differ from
    the folder's newest record; an existing record is never overwritten.
    """

    def write() -> None:
        flags = vars(args)
        target = name
        if target is None:
            record = _latest_flags(args.log_dir)
            if record is None:
                target = "flags.json"
            elif {k: v for k, v in record[1].items() if k != "resume_checkpoint"} != {
                k: v for k, v in flags.items() if k != "resume_checkpoint"
            }:
                target = f"flags_resume_{resume_step_of(args.resume_checkpoint):06d}.json"
        if target is not None:
            payload = json.dumps(flags, indent=2, sort_keys=True).encode()
            atomic_write_bytes(payload, os.path.join(args.log_dir, target))

    dist_util.on_rank0(write)


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


# ----------------------------------------------------------------------------- randomness


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
    diffusion,
    ts: torch.Tensor,
    losses: Dict[str, torch.Tensor],
    *,
    metrics: Optional[DeviceMeans] = None,
) -> None:
    """Log each loss term's mean, overall and by quartile of t (keys ``loss``, ``loss_q0``..).

    With ``metrics``, the values are added to those device-side means (no sync); without,
    they go to ``logger.logkv_mean`` at once, as in guided-diffusion.
    """
    for key, values in losses.items():
        if metrics is not None:
            metrics.add_by_quartile(key, ts, values, diffusion.num_timesteps)
            continue
        logger.logkv_mean(key, values.mean().item())
        for sub_t, sub_loss in zip(ts.cpu().numpy(), values.detach().cpu().numpy()):
            quartile = int(4 * sub_t / diffusion.num_timesteps)
            logger.logkv_mean(f"{key}_q{quartile}", sub_loss)


# ----------------------------------------------------------------------- shared machinery


class TrainerBase(ABC):
    """What both loops share: loading a checkpoint on every rank, the optimizer, DDP, the
    loop with its log, save and preemption points, and the checkpoint writer.

    Subclasses set the attributes their ``__init__`` documents, then call ``_setup``; they
    implement ``_done``, ``_train_step`` (one optimizer step, ``self.step += 1``) and
    ``_checkpoint_files``.
    """

    checkpoint_kind = "model"
    model: nn.Module
    data: Iterator[Batch]

    def _setup(
        self,
        *,
        resume_checkpoint: str,
        lr: float,
        weight_decay: float,
        seed: int,
        batch_size: int,
        log_interval: int,
        save_interval: int,
        checkpoint_dir: Optional[str],
        data_start_batch: int,
        channels_last: bool = False,
        **mp_kwargs: Any,
    ) -> None:
        self.lr, self.weight_decay, self.seed, self.batch_size = lr, weight_decay, seed, batch_size
        self.log_interval, self.save_interval = log_interval, save_interval
        self.checkpoint_dir, self.data_start_batch = checkpoint_dir, data_start_batch
        self.resume_checkpoint = resume_checkpoint
        self.step = 0  # steps taken in this run
        self.resume_step = resume_step_of(self.resume_checkpoint)  # steps taken before it
        self.global_batch = batch_size * dist_util.get_world_size()
        self.metrics = DeviceMeans()
        self._data_positioned = False
        self._load_and_sync_parameters()
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.mp_trainer = MixedPrecisionTrainer(model=self.model, **mp_kwargs)
        device = dist_util.dev()
        self.opt = AdamW(
            self.mp_trainer.master_params,
            lr=lr,
            weight_decay=weight_decay,
            fused=device.type == "cuda",  # one kernel per step; the same state dict
        )
        if self.resume_step:
            self._load_optimizer_state()
        self.use_ddp = dist_util.get_world_size() > 1
        self.ddp_model: nn.Module = self.model
        if self.use_ddp:
            with warnings.catch_warnings():  # torch 2.13 renames broadcast_buffers; the
                # original's semantics (no buffer sync at all) have no new spelling yet
                warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated")
                self.ddp_model = DDP(
                    self.model,
                    device_ids=[device] if device.type == "cuda" else None,
                    broadcast_buffers=False,
                    bucket_cap_mb=128,
                    find_unused_parameters=False,
                )

    # ----------------------------------------------------------------- resume

    def _load_and_sync_parameters(self) -> None:
        if self.resume_checkpoint:
            logger.log(f"loading model from checkpoint: {self.resume_checkpoint}...")
            load_model_checkpoint(self.model, self.resume_checkpoint, kind=self.checkpoint_kind)
        dist_util.sync_params(self.model.parameters())
        dist_util.sync_params(self.model.buffers())

    def _sibling(self, prefix: str, what: str) -> Optional[str]:
        """``{prefix}NNNNNN.pt`` of the resumed step, or None (with a warning) if missing."""
        path = sibling_checkpoint(self.resume_checkpoint, prefix, self.resume_step)
        if path is None:
            logger.warn(f"no {prefix}{self.resume_step:06d}.pt: {what} starts afresh")
        return path

    def _load_optimizer_state(self) -> None:
        path = self._sibling("opt", "the optimizer state")
        if path is None:
            return
        logger.log(f"loading optimizer state from checkpoint: {path}...")
        state_dict = dist_util.load_state_dict(path, map_location=dist_util.dev())
        try:
            self.opt.load_state_dict(state_dict)
        except ValueError as e:
            raise ValueError(
                f"{path} does not fit this optimizer (was --use_fp16 the same?): {e}"
            ) from None

    # ------------------------------------------------------------------ loop

    @property
    def global_step(self) -> int:
        """Optimizer steps taken, counting those before the resume."""
        return self.step + self.resume_step

    def _position_data(self) -> None:
        """Skip the batches of the resumed steps that the stream does not start past."""
        skip_batches(self.data, self.resume_step - self.data_start_batch)

    def run_loop(self) -> None:
        """Train until ``_done``, logging every ``log_interval`` and saving every
        ``save_interval`` steps and at the end; after a SIGTERM, save and raise ``Preempted``."""
        if not self._data_positioned:
            self._position_data()
            self._data_positioned = True
        last_saved = self.global_step
        while not self._done():
            self._train_step()
            step = self.global_step
            if step % self.log_interval == 0:
                self.log_step()
                logger.dumpkvs()
            if step % self.save_interval == 0:
                self.save()
                last_saved = step
            if self._stop_agreed():
                if last_saved != step:
                    self.save()
                path = os.path.join(self._checkpoint_dir(), f"model{step:06d}.pt")
                raise Preempted(
                    f"preempted at step {step}: saved {path}; rerun the same command to resume"
                )
        if self.global_step != last_saved:
            self.save()

    def _stop_agreed(self) -> bool:
        """Whether any rank got a SIGTERM: every step on one process; with several, the ranks
        combine their flags every ``STOP_CHECK_INTERVAL`` steps (every rank calls)."""
        if dist_util.get_world_size() == 1:
            return stop_requested()
        if self.global_step % STOP_CHECK_INTERVAL:
            return False
        flag = torch.tensor([float(stop_requested())], device=dist_util.dev())
        return bool(dist_util.all_reduce_mean(flag).item() > 0)

    def log_step(self) -> None:
        """Hand this interval's means and the step counters to the logger."""
        self.metrics.flush()
        logger.logkv("step", self.global_step)
        logger.logkv("samples", self.global_step * self.global_batch)

    def _checkpoint_dir(self) -> str:
        return self.checkpoint_dir or logger.get_dir()

    def save(self) -> None:
        """Write this step's files atomically on rank 0 (``modelNNNNNN.pt`` last)."""
        save_step_files(self._checkpoint_files(self.global_step), self._checkpoint_dir())

    def _master_state_dict(self, params: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        return cpu_state_dict(self.mp_trainer.master_params_to_state_dict(params))

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP's ``no_sync`` for all but the last microbatch of a step that computes gradients."""
        if self.use_ddp and not last and torch.is_grad_enabled():
            return self.ddp_model.no_sync()
        return contextlib.nullcontext()

    @abstractmethod
    def _done(self) -> bool:
        """Whether the run has reached its last step."""

    @abstractmethod
    def _train_step(self) -> None:
        """One optimizer step (next batch, forward, backward, update); ``self.step += 1``."""

    @abstractmethod
    def _checkpoint_files(self, step: int) -> Dict[str, Any]:
        """``{file name: object}`` of this step, ``modelNNNNNN.pt`` last."""


# ---------------------------------------------------------------------------- scripts


def run_training(loop: TrainerBase, args: argparse.Namespace) -> None:
    """The end of a training script: record the flags (``save_flags``), train, tear down.

    A preempted run raises ``cli.Preempted`` on every rank at the same step, right after
    its checkpoint is saved; ``cli.cli`` prints it on rank 0 and exits with 143.
    """
    save_flags(args)
    formats = logger.get_current().output_formats  # rank 0 keeps the original's progress.csv
    if dist_util.is_main() and not any(isinstance(f, logger.CSVOutputFormat) for f in formats):
        formats.append(logger.make_output_format("csv", args.log_dir))
    logger.log("training...")
    loop.run_loop()
    logger.log("training done")
    dist_util.cleanup()
