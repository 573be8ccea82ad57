"""Training loops for the diffusion model (``TrainLoop``) and the noisy-image classifier
(``ClassifierTrainLoop``), built on one set of DDP, resume, seeding, logging and saving
helpers (``train_base``, which also describes the checkpoint files and how a rerun resumes).

A training script: ``args = cli.start_script(parser, "train")``, ``args.resume_checkpoint =
prepare_run(args)``, build the model and ``training_data(args, ...)``, then
``run_training(TrainLoop.from_args(args, model, diffusion, data), args)``.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dist_util, logger
from .checkpoints import read_state_dict
from .flags import CLASSIFIER_TRAIN_FLAGS, GROUP_DEFAULTS, TRAIN_FLAGS, flag_defaults
from .image_datasets import load_data
from .io_util import atomic_save, atomic_write_bytes  # noqa: F401 - their old home was here
from .likelihood import run_bpd_evaluation  # noqa: F401 - its old home was here
from .nn import update_ema
from .resample import LossAwareSampler, UniformSampler, create_named_schedule_sampler
from .seeding import step_seed  # noqa: F401 - its old home was here
from .train_base import (  # noqa: F401 - re-exported: their old home was here
    STOP_CHECK_INTERVAL,
    Batch,
    DeviceMeans,
    TrainerBase,
    cpu_state_dict,
    find_ema_checkpoint,
    find_resume_checkpoint,
    load_model_checkpoint,
    log_loss_dict,
    parse_ema_rates,
    parse_resume_step_from_filename,
    prepare_run,
    resume_step_of,
    run_training,
    save_flags,
    save_step_files,
    seed_step,
    sibling_checkpoint,
    skip_batches,
)


def image_train_defaults() -> Dict[str, Any]:
    """Defaults of the training flags of ``image_train.py`` and ``super_res_train.py``."""
    return flag_defaults(TRAIN_FLAGS, **GROUP_DEFAULTS["train"])


def classifier_train_defaults() -> Dict[str, Any]:
    """Defaults of the training flags of ``classifier_train.py``."""
    return flag_defaults(CLASSIFIER_TRAIN_FLAGS, **GROUP_DEFAULTS["classifier_train"])


def get_blob_logdir() -> str:
    """The folder checkpoints are written to: the logger's (guided-diffusion's name)."""
    return logger.get_dir()


# ----------------------------------------------------------------------------- data


def training_data(args: argparse.Namespace, image_size: int, **kwargs: Any) -> Iterator[Batch]:
    """The training stream of the flags (``load_data``), positioned at the resumed step.

    ``--class_cond``, ``--in_channels`` and ``--random_flip`` come from ``args`` where it
    has them; ``kwargs`` override them and pass anything else on to ``load_data``.
    """
    for name in ("class_cond", "in_channels", "random_flip"):
        if hasattr(args, name):
            kwargs.setdefault(name, getattr(args, name))
    return load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=image_size,
        seed=args.seed,
        num_workers=args.num_workers,
        start_batch=resume_step_of(args.resume_checkpoint),
        **kwargs,
    )


def superres_batches(data: Iterator[Batch], small_size: int) -> Iterator[Batch]:
    """Add ``low_res`` (the batch area-downsampled to ``small_size``) to the model kwargs."""
    for large_batch, model_kwargs in data:
        model_kwargs = dict(model_kwargs)
        model_kwargs["low_res"] = F.interpolate(large_batch, small_size, mode="area")
        yield large_batch, model_kwargs


# ---------------------------------------------------------------------- diffusion loop


def _setup_args(params: Dict[str, Any]) -> Dict[str, Any]:
    """The arguments of ``TrainerBase._setup`` among a loop constructor's ``locals()``; the
    checkpoint is the one guided-diffusion's ``find_resume_checkpoint()`` hook names, if any."""
    names = (
        "lr weight_decay seed batch_size log_interval save_interval checkpoint_dir data_start_batch"
    ).split()
    args = {k: params[k] for k in names}
    args["resume_checkpoint"] = find_resume_checkpoint() or params["resume_checkpoint"]
    return args


class TrainLoop(TrainerBase):
    """The training loop of the diffusion model (ADM; DDPM-IP with ``input_perturbation``).

    :param data: iterator of ``(batch [N, C, H, W] in [-1, 1], model kwargs)``, positioned
        at batch ``data_start_batch`` (e.g. ``load_data(start_batch=resume_step)``); the loop
        skips the batches of the resumed steps that remain.
    :param batch_size: images per rank per step; ``microbatch`` splits them (-1: no split).
        The gradient is the mean over the whole batch whatever the split.
    :param ema_rate: a float, or comma-separated rates like ``"0.9999,0.99"``.
    :param use_fp16: fp16 trunk weights, fp32 master params and dynamic loss scaling.
    :param use_bf16: bfloat16 autocast of the forward pass with fp32 weights (no scaling).
    :param seed: seeds every random draw of a step as a function of (seed, rank, step).
    :param max_steps: stop (and save) when this many steps are done; 0 = no limit.
    :param compile: ``torch.compile`` the model; ``channels_last``: channels_last memory.
    :param checkpoint_dir: where checkpoints go (default: the logger's folder).
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
        self.model, self.diffusion, self.data = model, diffusion, data
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.ema_rate = parse_ema_rates(ema_rate)
        self.use_fp16, self.use_bf16 = use_fp16, use_bf16
        self.fp16_scale_growth = fp16_scale_growth
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion, seed=seed)
        self.lr_anneal_steps, self.max_steps = lr_anneal_steps, max_steps
        self.input_perturbation = input_perturbation
        self.class_dropout_prob = class_dropout_prob
        self.channels_last = channels_last
        self._setup(
            **_setup_args(locals()),
            channels_last=channels_last,
            use_fp16=use_fp16,
            fp16_scale_growth=fp16_scale_growth,
        )
        if self.resume_step:
            self.ema_params = [self._load_ema_parameters(rate) for rate in self.ema_rate]
            self._load_train_state()
        else:
            self.ema_params = [self._copy_master_params() for _ in self.ema_rate]
        if compile:
            self.ddp_model = torch.compile(self.ddp_model)

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, model: nn.Module, diffusion, data, schedule_sampler=None
    ) -> TrainLoop:
        """The loop of ``image_train.py``/``super_res_train.py``'s flags (the schedule sampler
        of ``--schedule_sampler`` unless given)."""
        if schedule_sampler is None:
            schedule_sampler = create_named_schedule_sampler(
                args.schedule_sampler, diffusion, seed=args.seed
            )
        names = (
            "batch_size microbatch lr ema_rate log_interval save_interval resume_checkpoint "
            "use_fp16 fp16_scale_growth weight_decay lr_anneal_steps input_perturbation seed "
            "max_steps use_bf16 compile channels_last"
        ).split()
        return cls(
            model=model,
            diffusion=diffusion,
            data=data,
            schedule_sampler=schedule_sampler,
            data_start_batch=resume_step_of(args.resume_checkpoint),
            class_dropout_prob=getattr(args, "class_dropout_prob", 0.0),
            **{k: getattr(args, k) for k in names},
        )

    # ----------------------------------------------------------------- resume

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

    def _load_train_state(self) -> None:
        path = self._sibling("state", "the loss scale and schedule sampler")
        if path is None:
            return
        state = dist_util.load_state_dict(path, map_location="cpu")
        self.mp_trainer.lg_loss_scale = float(state["lg_loss_scale"])
        self.schedule_sampler.load_state_dict(state["schedule_sampler"])

    # ------------------------------------------------------------------ loop

    def _done(self) -> bool:
        s = self.global_step
        return bool(
            (self.lr_anneal_steps and s >= self.lr_anneal_steps)
            or (self.max_steps and s >= self.max_steps)
        )

    def _train_step(self) -> None:
        self.run_step(*next(self.data))

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
            with self._no_sync(last=i + self.microbatch >= n):
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
            weighted = {k: v * weights[sl] for k, v in losses.items()}
            log_loss_dict(self.diffusion, t[sl], weighted, metrics=self.metrics)

    def _update_ema(self) -> None:
        for rate, params in zip(self.ema_rate, self.ema_params):
            update_ema(params, self.mp_trainer.master_params, rate=rate)

    def _anneal_lr(self) -> None:
        """lr of step k (0-based) = lr * (1 - k / lr_anneal_steps)."""
        if self.lr_anneal_steps:
            set_annealed_lr(self.opt, self.lr, self.global_step / self.lr_anneal_steps)

    def log_step(self) -> None:
        """The step counters, this interval's means and the learning rate."""
        super().log_step()
        logger.logkv("lr", self.opt.param_groups[0]["lr"])

    def _checkpoint_files(self, step: int) -> Dict[str, Any]:
        files: Dict[str, Any] = {}
        for rate, params in zip(self.ema_rate, self.ema_params):
            files[f"ema_{rate}_{step:06d}.pt"] = self._master_state_dict(params)
        files[f"opt{step:06d}.pt"] = self.opt.state_dict()
        files[f"state{step:06d}.pt"] = {
            "step": step,
            "lg_loss_scale": float(self.mp_trainer.lg_loss_scale),
            "schedule_sampler": self.schedule_sampler.state_dict(),
        }
        files[f"model{step:06d}.pt"] = self._master_state_dict(self.mp_trainer.master_params)
        return files


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


class ClassifierTrainLoop(TrainerBase):
    """Training of the noisy-image classifier (cross-entropy on x_t at random t).

    Checkpoints ``modelNNNNNN.pt`` (float32, official keys) and ``optNNNNNN.pt`` are saved
    every ``save_interval`` steps and at the end, like the original; ``resume_checkpoint``
    restores both on every rank. Validation (``val_data``) is evaluated every
    ``eval_interval`` steps and logged as ``val_loss``, ``val_acc@1``, ``val_acc@5``.
    """

    checkpoint_kind = "classifier"

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
        self.model, self.diffusion, self.data, self.val_data = model, diffusion, data, val_data
        self.noised, self.iterations, self.anneal_lr = noised, iterations, anneal_lr
        self.microbatch, self.eval_interval = microbatch, eval_interval
        self.schedule_sampler = schedule_sampler
        self._setup(**_setup_args(locals()), use_fp16=use_fp16, initial_lg_loss_scale=16.0)

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, model: nn.Module, diffusion, data, val_data=None
    ) -> ClassifierTrainLoop:
        """The loop of ``classifier_train.py``'s flags (timesteps from ``--schedule_sampler``
        when ``--noised``)."""
        sampler = None
        if args.noised:
            sampler = create_named_schedule_sampler(
                args.schedule_sampler, diffusion, seed=args.seed
            )
        names = (
            "noised iterations lr weight_decay anneal_lr batch_size microbatch "
            "resume_checkpoint log_interval eval_interval save_interval seed"
        ).split()
        return cls(
            model=model,
            diffusion=diffusion,
            data=data,
            val_data=val_data,
            schedule_sampler=sampler,
            use_fp16=args.classifier_use_fp16,
            data_start_batch=resume_step_of(args.resume_checkpoint),
            **{k: getattr(args, k) for k in names},
        )

    def _position_data(self) -> None:
        super()._position_data()
        if self.val_data is not None:
            skip_batches(self.val_data, self.resume_step // self.eval_interval)

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
            with self._no_sync(last=i == len(chunks) - 1):
                logits = self.ddp_model(sub_batch, timesteps=sub_t)
                loss = F.cross_entropy(logits.float(), sub_labels, reduction="none")
                if loss.requires_grad:
                    self.mp_trainer.backward(loss.mean() * len(sub_batch) / len(batch))
            losses = {
                f"{prefix}_loss": loss.detach(),
                f"{prefix}_acc@1": compute_top_k(logits, sub_labels, k=1, reduction="none"),
                f"{prefix}_acc@5": compute_top_k(logits, sub_labels, k=5, reduction="none"),
            }
            log_loss_dict(self.diffusion, sub_t, losses, metrics=self.metrics)

    def _done(self) -> bool:
        return self.global_step >= self.iterations

    def _train_step(self) -> None:
        step = self.global_step
        if self.anneal_lr:
            set_annealed_lr(self.opt, self.lr, step / self.iterations)
        seed_step(self.seed, step, self.schedule_sampler)
        self.mp_trainer.zero_grad()
        self.forward_backward_log(self.data)
        if self.mp_trainer.optimize(self.opt):
            self.metrics.add("grad_norm", self.mp_trainer.grad_norm)
            self.metrics.add("param_norm", self.mp_trainer.param_norm)
        self.step += 1
        if self.val_data is not None and self.global_step % self.eval_interval == 0:
            self.model.eval()
            with torch.no_grad():
                self.forward_backward_log(self.val_data, prefix="val")
            self.model.train()

    def _checkpoint_files(self, step: int) -> Dict[str, Any]:
        return {
            f"opt{step:06d}.pt": self.opt.state_dict(),
            f"model{step:06d}.pt": self._master_state_dict(self.mp_trainer.master_params),
        }
