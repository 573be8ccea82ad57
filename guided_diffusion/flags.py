"""The one table of command-line flags: defaults, help, choices and allowed ranges.

Every script builds its parser from this table (``add_flags``) and checks the parsed values
against it (``check_flags``); ``script_util``'s ``*_defaults()`` functions, the original
guided-diffusion API, are views of it. A flag name means one thing in every script; a few
scripts start from another default (``--batch_size`` is 16 for sampling, 1 for training, as
in guided-diffusion): the groups below carry those overrides.

Names and defaults are those of guided-diffusion, except ``--eps_scaler`` (default 1.0:
plain ADM; the original's 0.0 divided by zero) and the flags this project adds.
"""

from __future__ import annotations

import argparse
import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

NUM_CLASSES = 1000  # default of --num_classes (ImageNet)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SAMPLERS = ("ddpm", "ddim", "dpmpp2m")


@dataclass(frozen=True)
class Flag:
    """One flag: its default, help text, allowed values and range.

    ``low``/``high`` bound numbers (``open_low``/``open_high``: strictly); float flags must
    also be finite. ``warn`` is a (low, high) interval outside of which the value is
    accepted with a warning.
    """

    default: Any
    help: str
    choices: Tuple[Any, ...] = ()
    low: Optional[float] = None
    high: Optional[float] = None
    open_low: bool = False
    open_high: bool = False
    warn: Optional[Tuple[float, float]] = None


def _f(default: Any, help: str, **kw: Any) -> Flag:
    return Flag(default, help, **kw)


POSITIVE = dict(low=1)
NON_NEGATIVE = dict(low=0)
PROBABILITY = dict(low=0.0, high=1.0, open_high=True)

FLAGS: Dict[str, Flag] = {
    # ------------------------------------------------------------------ the UNet
    "image_size": _f(64, "image height and width in pixels", **POSITIVE),
    "in_channels": _f(
        3, "image channels (3: RGB, every official checkpoint; 1: grey)", choices=(1, 3)
    ),
    "num_channels": _f(128, "base channel count of the UNet", **POSITIVE),
    "num_res_blocks": _f(2, "residual blocks per resolution", **POSITIVE),
    "num_heads": _f(4, "attention heads (ignored when num_head_channels is set)", **POSITIVE),
    "num_heads_upsample": _f(-1, "attention heads in the upsampling path (-1: num_heads)", low=-1),
    "num_head_channels": _f(-1, "channels per attention head (-1: use num_heads)", low=-1),
    "attention_resolutions": _f("16,8", "comma-separated resolutions with self-attention"),
    "channel_mult": _f(
        "", "comma-separated channel multipliers per resolution ('' = by image_size)"
    ),
    "dropout": _f(0.0, "dropout rate in the residual blocks (training only)", **PROBABILITY),
    "class_cond": _f(False, "class-conditional model (labels in 0..num_classes-1)"),
    "num_classes": _f(NUM_CLASSES, "number of classes of a class-conditional model", **POSITIVE),
    "class_dropout_prob": _f(
        0.0,
        "training: replace the label by the null class num_classes with this probability, for "
        "classifier-free guidance; > 0 adds that class's embedding row (0.0: official layouts)",
        **PROBABILITY,
    ),
    "use_checkpoint": _f(False, "gradient checkpointing (saves memory when training)"),
    "use_scale_shift_norm": _f(True, "apply the timestep embedding as scale and shift (FiLM)"),
    "resblock_updown": _f(False, "resample inside residual blocks (BigGAN style)"),
    "use_fp16": _f(False, "run the UNet trunk in float16 (GPU only)"),
    "use_bf16": _f(
        False,
        "run the UNet trunk in bfloat16 (sampling: on GPUs and on CPUs with AVX512-BF16/AMX, "
        "samples move by ~1e-2; training: autocast)",
    ),
    "use_new_attention_order": _f(False, "qkv laid out as (all q, all k, all v), not per head"),
    # ------------------------------------------------------------------ the diffusion
    "learn_sigma": _f(False, "the model outputs the variance too (2x output channels)"),
    "diffusion_steps": _f(1000, "number of diffusion steps the model was trained with", **POSITIVE),
    "noise_schedule": _f("linear", "beta schedule", choices=("linear", "cosine")),
    "timestep_respacing": _f(
        "",
        "sampling steps: a count (100), counts per section (10,15,20) "
        "or ddimN ('' = diffusion_steps)",
    ),
    "use_kl": _f(False, "train on the variational bound (rescaled KL)"),
    "predict_xstart": _f(False, "the model predicts x_0 instead of the noise"),
    "rescale_timesteps": _f(False, "feed the model timesteps scaled to 0..1000"),
    "rescale_learned_sigmas": _f(False, "rescaled MSE: VB term weighted by num_timesteps/1000"),
    "eps_scaler": _f(
        1.0,
        "Epsilon Scaling b: eps is divided by lambda_i = k*i + b when sampling (1.0 = plain ADM)",
        low=0.0,
        open_low=True,
        warn=(0.5, 2.0),
    ),
    "eps_scaler_k": _f(
        0.0,
        "Epsilon Scaling k of lambda_i = k*i + b, i = sampling step index, 0 = last step "
        "(0.0 = uniform)",
        warn=(-0.1, 0.1),
    ),
    # ------------------------------------------------------------------ the classifier
    "classifier_use_fp16": _f(False, "run the classifier trunk in float16 (GPU only)"),
    "classifier_width": _f(128, "base channel count of the classifier", **POSITIVE),
    "classifier_depth": _f(2, "residual blocks per resolution in the classifier", **POSITIVE),
    "classifier_attention_resolutions": _f(
        "32,16,8", "resolutions with attention in the classifier"
    ),
    "classifier_use_scale_shift_norm": _f(True, "scale-shift timestep embedding in the classifier"),
    "classifier_resblock_updown": _f(True, "resample inside the classifier's residual blocks"),
    "classifier_pool": _f(
        "attention", "classifier head", choices=("adaptive", "attention", "spatial", "spatial_v2")
    ),
    "classifier_channel_mult": _f("", "classifier channel multipliers ('' = by image_size)"),
    # ------------------------------------------------------------------ super-resolution
    "large_size": _f(256, "output size of the super-resolution model", **POSITIVE),
    "small_size": _f(64, "input (low-resolution) size of the super-resolution model", **POSITIVE),
    "base_samples": _f(
        "",
        ".npz of low-resolution images: arr_0 uint8 [N, small, small, 3], "
        "arr_1 labels for class-conditional models",
    ),
    # ------------------------------------------------------------------ sampling
    "clip_denoised": _f(True, "clip each x_0 prediction to [-1, 1]"),
    "num_samples": _f(10000, "number of images to generate (measure, evaluate)", **POSITIVE),
    "batch_size": _f(16, "images per batch on each process", **POSITIVE),
    "use_ddim": _f(False, "DDIM sampling (--sampler ddim)"),
    "sampler": _f(
        "ddpm",
        "ddpm (ancestral), ddim (eta = --ddim_eta) or dpmpp2m (DPM-Solver++ 2M, Lu et al. 2022)",
        choices=SAMPLERS,
    ),
    "ddim_eta": _f(
        0.0, "DDIM eta: 0 deterministic, 1 DDPM-like noise (Song et al. 2021)", low=0.0, high=1.0
    ),
    "time_shift": _f(
        False,
        "time-shift sampling (TS-DPM, Li et al. 2024): while t > "
        "--ts_cutoff, step from the timestep whose noise level matches the sample's",
    ),
    "ts_cutoff": _f(300, "time-shift sampling only above this original timestep", **NON_NEGATIVE),
    "ts_window": _f(
        20, "time-shift search window (+- original timesteps; 0 = off)", **NON_NEGATIVE
    ),
    "guidance_scale": _f(
        1.0,
        "classifier-free guidance w: eps_u + w (eps_c - eps_u) (1.0 = "
        "plain conditional; needs a model trained with --class_dropout_prob)",
        low=0.0,
    ),
    "model_path": _f("", "model or EMA checkpoint (.pt state dict); empty: the bundled model"),
    "seed": _f(
        0, "base seed: every random draw derives from it and the sample's index", **NON_NEGATIVE
    ),
    "log_dir": _f("", "output folder (default: $OPENAI_LOGDIR, else a timestamped temp folder)"),
    "progress": _f(True, "show a progress bar on rank 0"),
    "channels_last": _f(True, "channels-last memory layout for the UNet (same math)"),
    "compile": _f(False, "torch.compile the UNet (slow first batch, faster afterwards)"),
    "compile_mode": _f(
        "default", "torch.compile mode (reduce-overhead adds CUDA graphs)", choices=COMPILE_MODES
    ),
    "classifier_path": _f("", "noisy-image classifier checkpoint (.pt state dict)"),
    "classifier_scale": _f(
        1.0, "classifier guidance scale s: the gradient of s * log p(y | x_t)", low=0.0
    ),
    # ------------------------------------------------------------------ data
    "data_dir": _f(
        "",
        "images: an image folder (class = file-name prefix) or an .npz (arr_0 "
        "uint8 NHWC, arr_1 labels)",
    ),
    "val_data_dir": _f("", "validation images (same formats as data_dir; '' = no evaluation)"),
    "num_workers": _f(
        1, "data loader worker processes per rank (0 = in the main process)", **NON_NEGATIVE
    ),
    "random_flip": _f(True, "flip each training image horizontally with probability 1/2"),
    # ------------------------------------------------------------------ training
    "schedule_sampler": _f(
        "uniform", "timestep sampler", choices=("uniform", "loss-second-moment")
    ),
    "lr": _f(1e-4, "AdamW learning rate", low=0.0, open_low=True),
    "weight_decay": _f(0.0, "AdamW weight decay", **NON_NEGATIVE),
    "lr_anneal_steps": _f(
        0,
        "anneal the learning rate linearly to 0 over this many steps and stop there (0 = constant)",
        **NON_NEGATIVE,
    ),
    "microbatch": _f(-1, "split each batch into chunks of this size (-1 = no split)", low=-1),
    "ema_rate": _f("0.9999", "comma-separated EMA decay rates, e.g. 0.9999,0.99"),
    "log_interval": _f(10, "write the logged means every this many steps", **POSITIVE),
    "save_interval": _f(10000, "save checkpoints every this many steps", **POSITIVE),
    "resume_checkpoint": _f(
        "",
        "resume from path/modelNNNNNN.pt ('' = the latest checkpoint "
        "in --log_dir when its flags match)",
    ),
    "fp16_scale_growth": _f(
        1e-3, "growth of log2(loss scale) per good fp16 step", low=0.0, open_low=True
    ),
    "input_perturbation": _f(
        0.0,
        "DDPM-IP gamma: the network sees x_t built from noise + gamma "
        "* xi, the target stays the noise (0.0 = plain ADM)",
        **NON_NEGATIVE,
    ),
    "max_steps": _f(
        0,
        "stop when this many steps are done, saving a final checkpoint (counts "
        "the resumed steps; 0 = no limit)",
        **NON_NEGATIVE,
    ),
    "noised": _f(True, "train the classifier on noisy images x_t at random t (else clean x_0)"),
    "iterations": _f(150000, "total classifier training steps", **POSITIVE),
    "anneal_lr": _f(False, "anneal the classifier learning rate linearly to 0"),
    "eval_interval": _f(5, "evaluate on val_data_dir every this many steps", **POSITIVE),
    # ------------------------------------------------------------------ exposure bias
    "mode": _f(
        "consecutive",
        "consecutive sampling from q(x_T | x_0), or one reverse step from "
        "a true x_t at every step (each_step)",
        choices=("consecutive", "each_step"),
    ),
    "compare_eps_scaler": _f(
        0.0,
        "also measure with Epsilon Scaling b = this on the same samples "
        "and noise (0 = no comparison)",
        **NON_NEGATIVE,
    ),
    "compare_eps_scaler_k": _f(0.0, "k of the comparison schedule lambda_i = k*i + b"),
    "exclude_steps": _f(
        "0",
        "comma-separated step indices i left out of the objective (0 = the last step; empty: none)",
    ),
    "b_range": _f(
        "0.95,1.10",
        "LO,HI: the range searched for b (and for lambda at both ends of the linear schedule)",
    ),
    "tol": _f(
        1e-4, "stop when the next change of b (or of lambda) is below this", low=0.0, open_low=True
    ),
    "max_evals": _f(8, "most sampling passes for the uniform fit, lambda = 1 included", low=2),
    "max_evals_linear": _f(5, "most sampling passes for the linear fit", **POSITIVE),
    "train_norm_csv": _f(
        "",
        "target curve: the train_norm column of an eps_norm.csv (same "
        "respacing) instead of this model's own training curve",
    ),
    # ------------------------------------------------------------------ the demo
    "out_dir": _f("demo_out", "output folder of the demo (rerun: resumes)"),
    "fmnist_source": _f(
        "",
        "folder of the Fashion-MNIST IDX files for datasets/fashion_mnist.py "
        "('' = Debian's /usr/share/datasets/fashion-mnist)",
    ),
    "steps": _f(20, "sampling steps (respaced DDPM)", **POSITIVE),
    "lambdas": _f(
        "0.99,1.0,1.005,1.01,1.02",
        "uniform eps scalers of the sweep (1.0, the baseline, is always included)",
    ),
    "calib_samples": _f(64, "training images for the calibration", low=2),
    "eb_samples": _f(128, "training images for delta_t and the eps-norm curves", low=2),
    "num_boot": _f(500, "bootstrap resamples of each FID interval", low=10),
    "threads": _f(0, "torch CPU threads (0 = all cores)", **NON_NEGATIVE),
    # ------------------------------------------------------------------ exposure study
    "settings": _f(
        "bundled_10:bundled:10",
        "space-separated settings LABEL:MODEL:STEPS[:N[:GRID]] (MODEL: bundled or a checkpoint "
        "of the bundled architecture; N: samples, default --num_samples; GRID: lambdas, "
        "default --lambdas)",
    ),
    "train_samples": _f(256, "training images of the training eps-norm curve", low=2),
    "data_samples": _f(2000, "training images of the data moments (noise level)", low=2),
    # ------------------------------------------------------------------ sampler comparison
    "steps_list": _f("10,20,50", "comma-separated sampling step counts"),
    "methods": _f(
        "adm,es,ts,ts_es,ddim,ddim_eta1,dpmpp2m,dpmpp2m_es",
        "comma-separated methods: adm (DDPM), es (DDPM + eps scaler), ts (time shift), ts_es, "
        "ddim (eta 0), ddim_eta1, dpmpp2m (DPM-Solver++ 2M), dpmpp2m_es",
    ),
    "es_scaler": _f(
        0.0,
        "b of the *_es methods (0 = calibrate it for each step count on --calib_samples images "
        "of --data_dir)",
        **NON_NEGATIVE,
    ),
    "ref_batch": _f("", "reference batch .npz for FID (arr_0 uint8 [N, H, W, 3])"),
    "feature_net": _f(
        "inception", "the evaluator's feature network", choices=("inception", "fmnist")
    ),
    # ------------------------------------------------------------------ tools
    "checkpoint": _f("", "model or EMA checkpoint (.pt state dict)"),
    "flags": _f("", "flags.json written by image_train.py"),
    "out": _f(
        "",
        "output path (export_model.py: a prefix for PREFIX_ema.pt and PREFIX.json; "
        "train_fmnist_classifier.py: the state dict, its JSON card beside it)",
    ),
    "description": _f("", "one line about the model"),
    "extra_json": _f("", "a JSON file merged into the metadata"),
    "train_npz": _f("", "fmnist_train.npz (arr_0 images, arr_1 labels)"),
    "test_npz": _f("", "fmnist_test.npz, for the reported accuracy"),
    "epochs": _f(4, "passes over the training split", **POSITIVE),
}

# ---------------------------------------------------------------------------- groups

MODEL_FLAGS = (
    "image_size num_channels num_res_blocks num_heads num_heads_upsample num_head_channels "
    "attention_resolutions channel_mult dropout class_cond num_classes use_checkpoint "
    "use_scale_shift_norm resblock_updown use_fp16 use_bf16 use_new_attention_order "
    "in_channels class_dropout_prob"
).split()
DIFFUSION_FLAGS = (
    "learn_sigma diffusion_steps noise_schedule timestep_respacing use_kl predict_xstart "
    "rescale_timesteps rescale_learned_sigmas eps_scaler eps_scaler_k"
).split()
CLASSIFIER_FLAGS = (
    "image_size classifier_use_fp16 classifier_width classifier_depth "
    "classifier_attention_resolutions classifier_use_scale_shift_norm "
    "classifier_resblock_updown classifier_pool classifier_channel_mult"
).split()
SAMPLING_FLAGS = (
    "clip_denoised num_samples batch_size use_ddim sampler ddim_eta time_shift ts_cutoff "
    "ts_window guidance_scale model_path seed log_dir progress channels_last compile "
    "compile_mode"
).split()
TRAIN_FLAGS = (
    "data_dir schedule_sampler lr weight_decay lr_anneal_steps batch_size microbatch ema_rate "
    "log_interval save_interval resume_checkpoint fp16_scale_growth input_perturbation seed "
    "log_dir max_steps compile channels_last num_workers random_flip"
).split()
CLASSIFIER_TRAIN_FLAGS = (
    "data_dir val_data_dir noised iterations lr weight_decay anneal_lr batch_size microbatch "
    "schedule_sampler resume_checkpoint log_interval eval_interval save_interval seed log_dir "
    "num_workers"
).split()
MEASUREMENT_FLAGS = (
    "data_dir num_samples batch_size use_ddim clip_denoised model_path seed log_dir progress"
).split()

# the defaults a group starts from where they differ from the table's (as guided-diffusion)
GROUP_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "train": dict(batch_size=1, channels_last=False),
    "classifier_train": dict(lr=3e-4, batch_size=4),
}


def flag_defaults(names: Iterable[str], **overrides: Any) -> Dict[str, Any]:
    """``{name: default}`` for the given flags (in order), with ``overrides`` applied."""
    out = {}
    for name in names:
        if name not in FLAGS:
            raise KeyError(f"unknown flag {name!r}: add it to guided_diffusion/flags.py")
        out[name] = FLAGS[name].default
    for name, value in overrides.items():
        if name not in FLAGS:
            raise KeyError(f"unknown flag {name!r}: add it to guided_diffusion/flags.py")
        out[name] = value
    return out


# ---------------------------------------------------------------------------- parsing


def str2bool(v: Any) -> bool:
    """Parse a boolean flag value (yes/no, true/false, t/f, y/n, 1/0)."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")


def add_flags(
    parser: argparse.ArgumentParser,
    defaults: Mapping[str, Any],
    help: Optional[Mapping[str, str]] = None,
    choices: Optional[Mapping[str, Sequence[Any]]] = None,
) -> None:
    """Add one ``--name`` per entry of ``defaults``, typed like its default.

    Help text and choices come from the table (``help``/``choices`` override them, for
    flags outside the table too). Booleans parse yes/no/true/false/1/0.
    """
    for name, value in defaults.items():
        flag = FLAGS.get(name)
        text = (help or {}).get(name) or (flag.help if flag else name.replace("_", " "))
        allowed = (choices or {}).get(name) or (flag.choices if flag else ())
        v_type: Any = (
            str if value is None else (str2bool if isinstance(value, bool) else type(value))
        )
        kwargs: Dict[str, Any] = dict(
            default=value, type=v_type, help=f"{text} (default: {value!r})"
        )
        if allowed:
            kwargs["choices"] = tuple(allowed)
        parser.add_argument(f"--{name}", **kwargs)


def make_parser(
    doc: str,
    names: Iterable[str],
    help: Optional[Mapping[str, str]] = None,
    **defaults: Any,
) -> argparse.ArgumentParser:
    """A script's parser: described by the first line of ``doc`` (its ``__doc__``), with the
    flags ``names`` of the table; ``defaults`` are the script's own starting values."""
    parser = argparse.ArgumentParser(description=doc.strip().split("\n")[0])
    add_flags(parser, flag_defaults(list(names), **defaults), help=help)
    return parser


def check_flags(args: argparse.Namespace, warn: bool = True) -> None:
    """Check every parsed flag that is in the table against its range.

    Raises ``ValueError`` with one line naming the flag, its value and the allowed range;
    values outside a flag's ``warn`` interval give a ``UserWarning`` (when ``warn``).
    """
    for name, value in vars(args).items():
        flag = FLAGS.get(name)
        if flag is None or isinstance(value, (bool, str)) or value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{name} must be a finite number, got {value}")
        problem = _range_problem(flag, value)
        if problem:
            raise ValueError(f"--{name} {problem}, got {value:g}")
        if warn and flag.warn is not None and not flag.warn[0] < value < flag.warn[1]:
            warnings.warn(
                f"--{name} {value:g} lies far outside the usual range "
                f"({flag.warn[0]:g}, {flag.warn[1]:g}); results are likely degraded",
                stacklevel=2,
            )


def _range_problem(flag: Flag, value: float) -> str:
    """'' if ``value`` is within the flag's range, else what the range is."""
    lo_bad = flag.low is not None and (value <= flag.low if flag.open_low else value < flag.low)
    hi_bad = flag.high is not None and (value >= flag.high if flag.open_high else value > flag.high)
    if not (lo_bad or hi_bad):
        return ""
    if flag.high is None and (flag.low, flag.open_low) in ((0, True), (1, False)):
        return "must be positive"
    if flag.high is None and (flag.low, flag.open_low) == (0, False):
        return "must be non-negative"
    parts = []
    if flag.low is not None:
        parts.append(f"{'>' if flag.open_low else '>='} {flag.low:g}")
    if flag.high is not None:
        parts.append(f"{'<' if flag.open_high else '<='} {flag.high:g}")
    return "must be " + " and ".join(parts)
