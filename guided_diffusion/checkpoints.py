"""Safe checkpoint loading with a readable diagnosis when a checkpoint does not fit the flags.

Checkpoints are plain state dicts (the official ADM files, and ``modelNNNNNN.pt`` /
``ema_RATE_NNNNNN.pt`` written by training). They are read with
``torch.load(weights_only=True)``: tensors load, pickled code is refused.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn as nn

from . import dist_util
from .script_util import CHANNEL_MULT, resolve_channel_mult


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message is one line and says why."""


def clean_state_dict_keys(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Strip the prefixes that ``torch.compile`` (``_orig_mod.``) and DDP (``module.``) add."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a state dict (every rank calls this; rank 0 reads the file and broadcasts it)."""
    try:
        state = dist_util.load_state_dict(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as e:  # unpickling refused, truncated file, not a torch file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: {reason} (expected a state dict saved with torch.save)"
        ) from None
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise CheckpointError(
            f"{path} is not a state dict of tensors (got {type(state).__name__}); "
            "pass a model or EMA checkpoint such as ema_0.9999_500000.pt"
        )
    return clean_state_dict_keys(state)


def _submodule_kinds(state_dict: Mapping[str, torch.Tensor], prefix: str) -> Dict[int, str]:
    """For the blocks under ``prefix`` (e.g. ``output_blocks.3.``): index -> res/attn/up/conv."""
    kinds: Dict[int, str] = {}
    pat = re.compile(re.escape(prefix) + r"(\d+)\.(\w+)")
    for k in state_dict:
        m = pat.match(k)
        if not m:
            continue
        idx, name = int(m.group(1)), m.group(2)
        kind = {"in_layers": "res", "qkv": "attn", "conv": "up", "op": "down"}.get(name)
        if kind and idx not in kinds:
            kinds[idx] = kind
    return kinds


def infer_unet_flags(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Read the architecture flags that a UNet state dict implies from its keys and shapes.

    Returns a dict with some of: ``num_channels``, ``learn_sigma``, ``class_cond``,
    ``num_classes``, ``use_scale_shift_norm``, ``num_res_blocks``, ``channel_mult`` (tuple),
    ``attention_ds`` (downsampling factors with attention), ``resblock_updown``.
    """
    sd = state_dict
    flags: Dict[str, Any] = {}
    if "time_embed.0.weight" in sd:
        flags["num_channels"] = int(sd["time_embed.0.weight"].shape[1])
    if "out.2.weight" in sd:
        out_ch = int(sd["out.2.weight"].shape[0])
        flags["learn_sigma"] = out_ch == 6
        flags["_out_channels"] = out_ch
    flags["class_cond"] = "label_emb.weight" in sd
    if flags["class_cond"]:
        flags["num_classes"] = int(sd["label_emb.weight"].shape[0])
    emb = sd.get("input_blocks.1.0.emb_layers.1.weight")
    out3 = sd.get("input_blocks.1.0.out_layers.3.weight")
    if emb is not None and out3 is not None:
        flags["use_scale_shift_norm"] = emb.shape[0] == 2 * out3.shape[0]

    # the output path: level by level from the lowest resolution, num_res_blocks + 1 blocks each
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"output_blocks\.(\d+)\.", k))})
    if not blocks or "num_channels" not in flags:
        return flags
    kinds = [_submodule_kinds(sd, f"output_blocks.{b}.") for b in blocks]
    first_up = next(
        (
            n
            for n, kd in enumerate(kinds)
            if "up" in kd.values() or sum(v == "res" for v in kd.values()) > 1
        ),
        None,
    )
    if first_up is None:
        return flags
    per_level = first_up + 1
    if len(blocks) % per_level:
        return flags
    levels = len(blocks) // per_level
    flags["num_res_blocks"] = per_level - 1
    flags["resblock_updown"] = sum(v == "res" for v in kinds[first_up].values()) > 1
    nc = flags["num_channels"]
    mult, attn = [], set()
    for lev in range(levels):
        b = blocks[lev * per_level]
        ch = int(sd[f"output_blocks.{b}.0.out_layers.3.weight"].shape[0])
        mult.append(ch / nc if ch % nc else ch // nc)
        if "attn" in kinds[lev * per_level].values():
            attn.add(2 ** (levels - 1 - lev))
    flags["channel_mult"] = tuple(reversed(mult))
    flags["attention_ds"] = tuple(sorted(attn))
    return flags


def _fmt_mult(mult) -> str:
    return ",".join(str(m) for m in mult)


def describe_unet_mismatch(
    state_dict: Mapping[str, torch.Tensor], flags: Mapping[str, Any]
) -> List[str]:
    """The flags that disagree with the checkpoint, each as ``--flag X (checkpoint: Y)``."""
    inferred = infer_unet_flags(state_dict)
    image_size = flags.get("image_size")
    problems = []
    for key in (
        "learn_sigma",
        "class_cond",
        "num_classes",
        "num_channels",
        "num_res_blocks",
        "use_scale_shift_norm",
        "resblock_updown",
    ):
        if key not in inferred or key not in flags:
            continue
        if key == "num_classes" and not flags.get("class_cond"):
            continue
        if inferred[key] != flags[key]:
            extra = ""
            if key == "learn_sigma":
                extra = f", {inferred['_out_channels']} output channels"
            problems.append(f"--{key} {flags[key]} (checkpoint: {inferred[key]}{extra})")
    if "channel_mult" in inferred and image_size:
        try:
            want = resolve_channel_mult(flags.get("channel_mult", ""), image_size)
        except ValueError:
            want = None
        if want is not None and tuple(want) != tuple(inferred["channel_mult"]):
            sizes = [
                s for s, m in CHANNEL_MULT.items() if tuple(m) == tuple(inferred["channel_mult"])
            ]
            hint = f", the default for --image_size {sizes[0]}" if sizes else ""
            problems.append(
                f"--channel_mult {_fmt_mult(want)} from --image_size {image_size} "
                f"(checkpoint: {_fmt_mult(inferred['channel_mult'])}{hint})"
            )
    if "attention_ds" in inferred and image_size and "attention_resolutions" in flags:
        try:
            given = sorted(
                {image_size // int(r) for r in str(flags["attention_resolutions"]).split(",") if r}
            )
        except ValueError:
            given = None
        ckpt = sorted(inferred["attention_ds"])
        if given is not None and given != ckpt:
            problems.append(
                f"--attention_resolutions {flags['attention_resolutions']} "
                f"(checkpoint: {','.join(str(image_size // d) for d in ckpt)} "
                f"at --image_size {image_size})"
            )
    return problems


def describe_classifier_mismatch(
    state_dict: Mapping[str, torch.Tensor], flags: Mapping[str, Any]
) -> List[str]:
    """Classifier flags that disagree with the checkpoint (width and number of classes)."""
    problems = []
    width = state_dict.get("time_embed.0.weight")
    if width is not None and flags.get("classifier_width") not in (None, width.shape[1]):
        problems.append(
            f"--classifier_width {flags['classifier_width']} (checkpoint: {width.shape[1]})"
        )
    head = [k for k in ("out.2.c_proj.weight", "out.3.weight") if k in state_dict]
    if head and "num_classes" in flags:
        n = int(state_dict[head[0]].shape[0])
        if n != flags["num_classes"]:
            problems.append(f"--num_classes {flags['num_classes']} (checkpoint: {n})")
    return problems


def _generic_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str:
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(
            f"{len(shapes)} shape mismatches (first: {k} {tuple(state_dict[k].shape)} in the "
            f"checkpoint vs {tuple(own[k].shape)} from the flags)"
        )
    return "; ".join(parts)


def load_checkpoint_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    flags: Optional[Mapping[str, Any]] = None,
    path: str = "checkpoint",
    kind: str = "model",
    assign: bool = False,
) -> None:
    """``model.load_state_dict(state_dict, strict=True)``, or a one-line ``CheckpointError``.

    When keys or shapes disagree, the error names the flags that are wrong and the values
    the checkpoint implies (for UNets), or the first differing keys otherwise. ``assign``
    makes the model take the checkpoint's tensors (for models built on the meta device).
    """
    own = model.state_dict()
    fits = own.keys() == state_dict.keys() and all(own[k].shape == state_dict[k].shape for k in own)
    if not fits:
        describe = describe_unet_mismatch if kind == "model" else describe_classifier_mismatch
        problems = describe(state_dict, flags) if flags else []
        detail = "; ".join(problems) if problems else _generic_mismatch(model, state_dict)
        raise CheckpointError(f"{kind} checkpoint {path} does not match the flags: {detail}")
    model.load_state_dict(state_dict, strict=True, assign=assign)
