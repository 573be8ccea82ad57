"""Safe checkpoint loading with a readable diagnosis when a checkpoint does not fit the flags.

Checkpoints are plain state dicts (the official ADM files, and ``modelNNNNNN.pt`` /
``ema_RATE_NNNNNN.pt`` written by training). They are read with
``torch.load(weights_only=True)``: tensors load, pickled code is refused. A file that does
not load is explained in one line by :func:`describe_load_error` (pickled Python objects,
not a torch file, truncated); torch's own advice to retry with ``weights_only=False``
(which would run any code in the file) is never shown.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from . import dist_util

# script_util (the model code) is imported where a UNet layout is described, so that
# readers of other weights (the evaluator's feature nets) load only torch through here.


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


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6: a zip archive
# torch's legacy format starts with the pickled magic number 0x1950A86A20F9469CFC6C
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."
LoadSource = Union[str, os.PathLike, bytes, None]


def _peek(source: LoadSource) -> Optional[tuple]:
    """``(size, first 16 bytes, zip member names or None if not a readable zip)`` of a local
    file or bytes; None when it cannot be read here (a remote path, no permission)."""
    try:
        if isinstance(source, bytes):
            size, head, handle = len(source), source[:16], io.BytesIO(source)
        elif source is not None and "://" not in os.fspath(source):
            size = os.path.getsize(source)
            with open(source, "rb") as f:
                head = f.read(16)
            handle = source
        else:
            return None
    except OSError:
        return None
    names = None
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(handle) as zf:  # reads the central directory at the end only
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError):
            names = None
    return size, head, names


def describe_load_error(exc: BaseException, source: LoadSource = None) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in one line that names the fix.

    ``source`` (the file's path or bytes) lets the file itself tell a truncated checkpoint
    from something that is not a torch file at all; without it the exception alone is
    used. Never repeats torch's advice to set ``weights_only=False``.
    """
    if isinstance(exc, (IsADirectoryError, PermissionError)):
        return f"{exc.strerror.lower()}; pass a readable checkpoint file"
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if found:
        return (
            f"not a safe state dict (contains Python objects: {found.group(1)}); pass a "
            "plain state dict of tensors, saved with torch.save(model.state_dict(), path)"
        )
    peek = _peek(source)
    if peek is None:
        if "central directory" in str(exc) or isinstance(exc, EOFError):
            return "truncated (its end is missing); copy or save the checkpoint again"
        return f"not a torch checkpoint ({type(exc).__name__}); pass a file saved by torch.save"
    size, head, names = peek
    if size == 0:
        return "empty file (0 bytes); copy or save the checkpoint again"
    if head.startswith(_ZIP_MAGIC):
        if names is None:
            return (
                f"truncated ({size} bytes; the end of its zip archive is missing); copy or "
                "save the checkpoint again"
            )
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "not a torch checkpoint (a zip archive without data.pkl)"
        return f"corrupt torch checkpoint ({type(exc).__name__}); copy or save it again"
    if head.startswith(_LEGACY_MAGIC):
        return (
            f"truncated or corrupt (torch's legacy format, {size} bytes); copy or save the "
            "checkpoint again"
        )
    return (
        f"not a torch checkpoint ({size} bytes starting with {head[:8]!r}); pass a file "
        "saved by torch.save"
    )


def load_torch_file(path: Union[str, os.PathLike], map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` in this process, or a one-line
    ``CheckpointError`` (missing file, :func:`describe_load_error`). For single-process
    readers such as the evaluator's feature nets; scripts use :func:`read_state_dict`."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling refused, truncated, not a torch file
        raise CheckpointError(f"cannot read {path}: {describe_load_error(e, path)}") from None


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a state dict (every rank calls this; rank 0 reads the file and broadcasts it)."""
    try:
        state = dist_util.load_state_dict(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - unpickling refused, truncated, not a torch file
        raise CheckpointError(
            f"cannot read checkpoint {path}: {describe_load_error(e, path)}"
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

    Returns a dict with some of: ``num_channels``, ``in_channels``, ``learn_sigma``, ``class_cond``,
    ``num_classes``, ``use_scale_shift_norm``, ``num_res_blocks``, ``channel_mult`` (tuple),
    ``attention_ds`` (downsampling factors with attention), ``resblock_updown``.
    """
    sd = state_dict
    flags: Dict[str, Any] = {}
    if "time_embed.0.weight" in sd:
        flags["num_channels"] = int(sd["time_embed.0.weight"].shape[1])
    in_ch = 3
    if "input_blocks.0.0.weight" in sd:
        in_ch = flags["in_channels"] = int(sd["input_blocks.0.0.weight"].shape[1])
    if "out.2.weight" in sd:
        out_ch = int(sd["out.2.weight"].shape[0])
        flags["learn_sigma"] = out_ch == 2 * in_ch
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


def _resolutions(flags: Mapping[str, Any]) -> Optional[List[int]]:
    """``--attention_resolutions`` as positive ints, or None when it does not parse."""
    try:
        res = [int(r) for r in str(flags.get("attention_resolutions", "")).split(",") if r.strip()]
    except ValueError:
        return None
    return res if all(r > 0 for r in res) else None


def _attention_levels(resolutions: Sequence[int], image_size: int, levels: int) -> List[int]:
    """Downsampling factors that get attention at ``image_size`` (as ``UNetModel`` builds
    it: ``image_size // r`` for each resolution ``r``, where such a level exists)."""
    return sorted({image_size // r for r in resolutions} & {2**i for i in range(levels)})


def infer_image_size(
    inferred: Mapping[str, Any], flags: Mapping[str, Any], match_channel_mult: bool = True
) -> Optional[int]:
    """The ``--image_size`` at which the flags' ``--attention_resolutions`` (and, with
    ``match_channel_mult``, ``--channel_mult`` or its default for that size) give the
    checkpoint's layout, when exactly one size does; else None.

    A UNet's weights do not record the image size: only where attention sits
    (``image_size // resolution``) and, with ``--channel_mult ''``, the default channel
    multipliers of the size tell it.
    """
    from .script_util import resolve_channel_mult

    ckpt_ds, mult = inferred.get("attention_ds"), inferred.get("channel_mult")
    resolutions = _resolutions(flags)
    if not ckpt_ds or mult is None or not resolutions:
        return None
    fits = []
    for size in sorted({r * d for r in resolutions for d in ckpt_ds}):
        if _attention_levels(resolutions, size, len(mult)) != sorted(ckpt_ds):
            continue
        if match_channel_mult:
            try:
                if tuple(resolve_channel_mult(flags.get("channel_mult", ""), size)) != tuple(mult):
                    continue
            except ValueError:  # no default channel_mult for this size
                continue
        fits.append(size)
    return fits[0] if len(fits) == 1 else None


def describe_unet_mismatch(
    state_dict: Mapping[str, torch.Tensor], flags: Mapping[str, Any]
) -> List[str]:
    """The flags that disagree with the checkpoint, each as ``--flag X (checkpoint: Y)``.

    When another ``--image_size`` explains the attention and channel layout (see
    :func:`infer_image_size`), ``--image_size`` is named: alone when the flags are
    inconsistent at the given size (an attention resolution that does not divide it, or
    the default channel_mult of another size), else as the first of two possible fixes.
    """
    from .script_util import CHANNEL_MULT, resolve_channel_mult

    inferred = infer_unet_flags(state_dict)
    image_size = flags.get("image_size")
    problems = []
    for key in (
        "in_channels",
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
    mult = inferred.get("channel_mult")
    if not image_size or mult is None:
        return problems
    resolutions = _resolutions(flags)
    try:
        want_mult = resolve_channel_mult(flags.get("channel_mult", ""), image_size)
    except ValueError:
        want_mult = None
    mult_differs = want_mult is not None and tuple(want_mult) != tuple(mult)
    attention_differs = (
        "attention_ds" in inferred
        and resolutions is not None
        and "attention_resolutions" in flags
        and _attention_levels(resolutions, image_size, len(mult))
        != sorted(inferred["attention_ds"])
    )
    if not (mult_differs or attention_differs):
        return problems
    given_res = flags.get("attention_resolutions")
    size = infer_image_size(inferred, flags)
    if size is not None and size != image_size:
        wrong_here = (
            not str(flags.get("channel_mult", "")).strip()
            or mult_differs
            or any(image_size % r for r in resolutions)
        )
        if wrong_here:
            problems.append(
                f"--image_size {image_size} (checkpoint: {size}: its attention layers match "
                f"--attention_resolutions {given_res} and its channel_mult {_fmt_mult(mult)} "
                f"at --image_size {size})"
            )
            return problems
    else:  # the channel layout cannot tell: does the attention alone point to a size?
        size = infer_image_size(inferred, flags, match_channel_mult=False)
    if mult_differs:
        sizes = [s for s, m in CHANNEL_MULT.items() if tuple(m) == tuple(mult)]
        hint = f", the default for --image_size {sizes[0]}" if sizes else ""
        problems.append(
            f"--channel_mult {_fmt_mult(want_mult)} from --image_size {image_size} "
            f"(checkpoint: {_fmt_mult(mult)}{hint})"
        )
    if attention_differs:
        ckpt_res = ",".join(str(image_size // d) for d in sorted(inferred["attention_ds"]))
        attention = (
            f"--attention_resolutions {given_res} (checkpoint: {ckpt_res} at --image_size "
            f"{image_size})"
        )
        if size is not None and size != image_size:
            attention = (
                f"--image_size {image_size} (checkpoint: {size}, where its attention layers "
                f"match --attention_resolutions {given_res}) or {attention}"
            )
        problems.append(attention)
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


def describe_key_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str:
    """Missing keys, unexpected keys and shape mismatches of ``state_dict`` for ``model``, in
    one line (the first of each, and how many)."""
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
        detail = "; ".join(problems) if problems else describe_key_mismatch(model, state_dict)
        raise CheckpointError(f"{kind} checkpoint {path} does not match the flags: {detail}")
    model.load_state_dict(state_dict, strict=True, assign=assign)
