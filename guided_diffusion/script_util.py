"""Model and diffusion factories from the flags (guided-diffusion's ``script_util`` API).

The ``*_defaults()`` functions, ``add_dict_to_argparser``, ``args_to_dict`` and
``str2bool`` keep their original names and behaviour; the flags themselves (defaults, help,
choices, ranges) live in one table, ``flags.FLAGS``.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch

from . import gaussian_diffusion as gd
from .flags import (
    CLASSIFIER_FLAGS,
    DIFFUSION_FLAGS,
    FLAGS,
    MODEL_FLAGS,
    NUM_CLASSES,
    add_flags,
    flag_defaults,
    str2bool,  # noqa: F401 - guided-diffusion's API re-exported
)
from .respace import SpacedDiffusion, space_timesteps
from .unet import EncoderUNetModel, SuperResModel, UNetModel

# Channel multiplier per resolution when --channel_mult is not given (one table for all).
CHANNEL_MULT: Dict[int, Tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}
# Super-resolution models by output size (the original's table, plus 32 for small tests).
SR_CHANNEL_MULT: Dict[int, Tuple[float, ...]] = {
    512: (1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}
# Help text and choices of every flag: views of the one table in flags.py.
FLAG_HELP: Dict[str, str] = {name: flag.help for name, flag in FLAGS.items()}
FLAG_CHOICES: Dict[str, Sequence[Any]] = {n: f.choices for n, f in FLAGS.items() if f.choices}


def diffusion_defaults() -> Dict[str, Any]:
    """Defaults of the diffusion flags (image and classifier training share them)."""
    return flag_defaults(DIFFUSION_FLAGS)


def classifier_defaults() -> Dict[str, Any]:
    """Defaults of the noisy-image classifier flags."""
    return flag_defaults(CLASSIFIER_FLAGS)


def model_and_diffusion_defaults() -> Dict[str, Any]:
    """Defaults of the image model and diffusion flags."""
    return flag_defaults(MODEL_FLAGS + DIFFUSION_FLAGS)


def classifier_and_diffusion_defaults() -> Dict[str, Any]:
    return flag_defaults(CLASSIFIER_FLAGS + DIFFUSION_FLAGS)


def sr_model_and_diffusion_defaults() -> Dict[str, Any]:
    """Defaults of the super-resolution model flags."""
    names = [n for n in MODEL_FLAGS if n not in ("image_size", "channel_mult")]
    return flag_defaults(["large_size", "small_size"] + names + DIFFUSION_FLAGS)


def resolve_channel_mult(
    channel_mult: str | Sequence[float],
    image_size: int,
    table=CHANNEL_MULT,
    flag: str = "channel_mult",
) -> Tuple[float, ...]:
    """The channel multipliers: parsed from ``channel_mult`` or looked up by image size."""
    if isinstance(channel_mult, str) and channel_mult.strip() == "":
        if image_size not in table:
            raise ValueError(
                f"no default {flag} for image_size {image_size} (known: "
                f"{sorted(table)}); pass --{flag}, e.g. 1,2,2"
            )
        return tuple(table[image_size])
    if isinstance(channel_mult, str):
        try:
            return tuple(float(c) if "." in c else int(c) for c in channel_mult.split(","))
        except ValueError:
            raise ValueError(
                f"invalid --{flag} {channel_mult!r}: expected comma-separated numbers"
            ) from None
    return tuple(channel_mult)


def attention_ds(attention_resolutions: str, image_size: int) -> Tuple[int, ...]:
    """Downsampling factors with attention, from resolutions like ``"32,16,8"``."""
    try:
        resolutions = [int(r) for r in str(attention_resolutions).split(",") if r.strip()]
    except ValueError:
        raise ValueError(
            f"invalid attention_resolutions {attention_resolutions!r}: expected e.g. 32,16,8"
        ) from None
    return tuple(image_size // r for r in resolutions)


# the keyword arguments of create_model / sr_create_model besides the size and multipliers
_UNET_KWARGS = tuple(
    "num_channels num_res_blocks learn_sigma class_cond use_checkpoint attention_resolutions "
    "num_heads num_head_channels num_heads_upsample use_scale_shift_norm dropout "
    "resblock_updown use_fp16 use_new_attention_order num_classes use_bf16 in_channels "
    "class_dropout_prob".split()
)
# create_gaussian_diffusion's arguments and the flags they come from
_DIFFUSION_ARGS = dict(
    steps="diffusion_steps",
    learn_sigma="learn_sigma",
    noise_schedule="noise_schedule",
    use_kl="use_kl",
    predict_xstart="predict_xstart",
    rescale_timesteps="rescale_timesteps",
    rescale_learned_sigmas="rescale_learned_sigmas",
    timestep_respacing="timestep_respacing",
    eps_scaler="eps_scaler",
    eps_scaler_k="eps_scaler_k",
)


def diffusion_from_flags(flags: Mapping[str, Any]) -> SpacedDiffusion:
    """``create_gaussian_diffusion`` from the diffusion flags in ``flags`` (a dict or
    ``vars(args)``; missing ones take their defaults)."""
    return create_gaussian_diffusion(
        **{arg: flags[name] for arg, name in _DIFFUSION_ARGS.items() if name in flags}
    )


def _unet(
    cls: type,
    image_size: int,
    channel_mult: Sequence[float],
    *,
    num_channels: int,
    learn_sigma: bool,
    class_cond: bool,
    attention_resolutions: str,
    num_classes: int,
    use_fp16: bool,
    use_bf16: bool,
    in_channels: int,
    class_dropout_prob: float,
    null_class: Optional[bool],
    **kwargs: Any,
):
    """A UNet of class ``cls`` (``UNetModel`` or ``SuperResModel``) from the flags."""
    if use_fp16 and use_bf16:
        raise ValueError("use_fp16 and use_bf16 are exclusive: pick one half precision")
    check_class_dropout(class_dropout_prob, class_cond)
    model = cls(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=num_channels,
        out_channels=in_channels * (2 if learn_sigma else 1),
        attention_resolutions=attention_ds(attention_resolutions, image_size),
        channel_mult=channel_mult,
        num_classes=(num_classes if class_cond else None),
        use_fp16=use_fp16,
        null_class=class_dropout_prob > 0 if null_class is None else null_class,
        **kwargs,
    )
    if use_bf16:
        model.convert_to_fp16(torch.bfloat16)
    return model


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    channel_mult,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    use_new_attention_order,
    eps_scaler=1.0,
    eps_scaler_k=0.0,
    num_classes=NUM_CLASSES,
    use_bf16=False,
    in_channels=3,
    class_dropout_prob=0.0,
):
    """Build the UNet and its (respaced) diffusion from the flags."""
    flags = dict(locals())
    model = create_model(**{k: flags[k] for k in _UNET_KWARGS + ("image_size", "channel_mult")})
    return model, diffusion_from_flags(flags)


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    num_classes=NUM_CLASSES,
    attention_impl="auto",
    use_bf16=False,
    in_channels=3,
    class_dropout_prob=0.0,
    null_class: Optional[bool] = None,
) -> UNetModel:
    """Build the ADM UNet from the flags.

    ``null_class`` adds the "no label" row of classifier-free guidance to the label
    embedding (default: when ``class_dropout_prob > 0``).
    """
    mult = resolve_channel_mult(channel_mult, image_size)
    kw = {k: v for k, v in locals().items() if k not in ("image_size", "channel_mult", "mult")}
    return _unet(UNetModel, image_size, mult, **kw)


def check_class_dropout(class_dropout_prob: float, class_cond: bool) -> None:
    """``--class_dropout_prob`` must lie in [0, 1) and needs ``--class_cond True``."""
    if not 0.0 <= class_dropout_prob < 1.0:
        raise ValueError(f"--class_dropout_prob must lie in [0, 1), got {class_dropout_prob}")
    if class_dropout_prob > 0 and not class_cond:
        raise ValueError("--class_dropout_prob > 0 needs --class_cond True")


def create_classifier_and_diffusion(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    learn_sigma,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    eps_scaler=1.0,
    eps_scaler_k=0.0,
    classifier_channel_mult="",
    num_classes=NUM_CLASSES,
):
    """Build the noisy-image classifier and the diffusion it is trained with."""
    flags = dict(locals())
    keys = [k for k in classifier_defaults() if k in flags] + ["num_classes"]
    return create_classifier(**{k: flags[k] for k in keys}), diffusion_from_flags(flags)


def create_classifier(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    classifier_channel_mult="",
    num_classes=NUM_CLASSES,
    attention_impl="auto",
) -> EncoderUNetModel:
    """Build the noisy-image classifier (the encoder half of a UNet) from the flags."""
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=classifier_width,
        out_channels=num_classes,
        num_res_blocks=classifier_depth,
        attention_resolutions=attention_ds(classifier_attention_resolutions, image_size),
        channel_mult=resolve_channel_mult(
            classifier_channel_mult, image_size, flag="classifier_channel_mult"
        ),
        use_fp16=classifier_use_fp16,
        num_head_channels=64,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
        attention_impl=attention_impl,
    )


def sr_create_model_and_diffusion(
    large_size,
    small_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    use_new_attention_order=False,
    eps_scaler=1.0,
    eps_scaler_k=0.0,
    num_classes=NUM_CLASSES,
    use_bf16=False,
    in_channels=3,
    class_dropout_prob=0.0,
):
    """Build the super-resolution UNet (small_size -> large_size) and its diffusion."""
    flags = dict(locals())
    keys = _UNET_KWARGS + ("large_size", "small_size")
    return sr_create_model(**{k: flags[k] for k in keys}), diffusion_from_flags(flags)


def sr_create_model(
    large_size,
    small_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    resblock_updown,
    use_fp16,
    use_new_attention_order=False,
    num_classes=NUM_CLASSES,
    attention_impl="auto",
    use_bf16=False,
    in_channels=3,
    class_dropout_prob=0.0,
) -> SuperResModel:
    """Build the super-resolution UNet from the flags."""
    del small_size  # the low-resolution input is upsampled to large_size inside the model
    mult = resolve_channel_mult("", large_size, SR_CHANNEL_MULT)
    kw = {k: v for k, v in locals().items() if k not in ("large_size", "mult")}
    return _unet(SuperResModel, large_size, mult, null_class=None, **kw)


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
    eps_scaler=1.0,
    eps_scaler_k=0.0,
) -> SpacedDiffusion:
    """Build the (respaced) diffusion process from the flags.

    Raises ``ValueError`` for an unknown schedule, a respacing that cannot be honoured, or
    an Epsilon Scaling schedule with some lambda_i <= 0.
    """
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [steps]
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
        eps_scaler=eps_scaler,
        eps_scaler_k=eps_scaler_k,
    )


def add_dict_to_argparser(parser, default_dict):
    """Add one ``--name`` flag per entry of ``default_dict`` (guided-diffusion's signature;
    ``flags.add_flags`` with the project's help texts and choices)."""
    add_flags(parser, default_dict)


def args_to_dict(args: argparse.Namespace, keys: Iterable[str]) -> Dict[str, Any]:
    return {k: getattr(args, k) for k in keys}
