"""What every script shares at start-up and exit: flags, processes, the log folder, errors.

``start_script(parser, kind)`` is the one start-up of the scripts: parse and range-check the
flags (``flags.check_flags``), set up the processes (``dist_util``), apply the bundled model
when a sampling or measurement script gets no ``--model_path``, and open the log in
``--log_dir`` (the same folder on every rank). ``cli(main)`` runs a script's ``main``:
bad input prints one line (exit 2), Ctrl-C prints one line (exit 130), a SIGTERM is turned
into an orderly stop where the script supports it (training saves a checkpoint).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import torch

from . import dist_util, logger
from .fast_path import cpu_supports_fast_bf16
from .flags import check_flags
from .io_util import ensure_output_dir
from .script_util import model_and_diffusion_defaults

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_MODEL = REPO_ROOT / "models" / "adm_fmnist32_ema.pt"
BUNDLED_FLAGS = REPO_ROOT / "models" / "adm_fmnist32.json"
SCRIPT_KINDS = ("sample", "measure", "train", "evaluate")
INTERRUPTED = "interrupted; rerun the same command to resume"


class UserError(ValueError):
    """Bad input from the command line; printed as one line without a traceback."""


class Preempted(Exception):
    """Raised by ``check_stop()`` after a SIGTERM: the script stops after saving its work."""


# ----------------------------------------------------------------------------- exit paths


def cli(main: Callable[[], Any]) -> None:
    """Run a script's ``main``: one-line errors (exit 2), a one-line Ctrl-C (exit 130).

    Set ``ADM_ES_DEBUG=1`` to get the full traceback instead.
    """
    prog = os.path.basename(sys.argv[0])
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        main()
    except KeyboardInterrupt:
        if os.environ.get("ADM_ES_DEBUG"):
            raise
        if dist_util.is_main():
            print(f"\n{prog}: {INTERRUPTED}", file=sys.stderr, flush=True)
        sys.exit(130)
    except Preempted as e:
        main_rank = dist_util.is_main()
        dist_util.cleanup()  # every rank stops at the same step: they leave together
        if main_rank:
            print(f"{prog}: {e}", file=sys.stderr, flush=True)
        sys.exit(143)
    except (ValueError, OSError, NotImplementedError) as e:
        if os.environ.get("ADM_ES_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)


_STOP_REQUESTED = False


def _on_sigterm(signum: int, frame: Any) -> None:
    """Remember the request; long loops call ``stop_requested()`` at safe points."""
    global _STOP_REQUESTED
    _STOP_REQUESTED = True


def stop_requested() -> bool:
    """Whether this process received SIGTERM (e.g. a cluster preempting the job)."""
    return _STOP_REQUESTED


# ----------------------------------------------------------------------------- start-up


def start_script(
    parser: argparse.ArgumentParser, kind: str, argv: Optional[Sequence[str]] = None
) -> argparse.Namespace:
    """The one start-up of the scripts; returns the parsed (and completed) flags.

    ``kind``: ``sample`` (sampling: the bundled model without ``--model_path``, precision
    for the device), ``measure`` (the same, for eps-prediction models only), ``train``
    or ``evaluate`` (a log folder and the processes only).
    """
    if kind not in SCRIPT_KINDS:
        raise ValueError(f"kind must be one of {SCRIPT_KINDS}, got {kind!r}")
    args = parser.parse_args(argv)
    dist_util.setup_dist()
    with warnings.catch_warnings():
        if not dist_util.is_main():
            warnings.simplefilter("ignore")
        check_flags(args)
    if kind in ("sample", "measure"):
        apply_bundled_model(args, explicit_flags(parser, argv))
        resolve_precision(args, dist_util.dev())
    if kind == "measure" and getattr(args, "predict_xstart", False):
        raise UserError("epsilon norms need an eps-prediction model: use --predict_xstart False")
    if hasattr(args, "log_dir"):
        args.log_dir = dist_util.broadcast_object(args.log_dir or default_log_dir())
        dist_util.on_rank0(ensure_output_dir, args.log_dir, "--log_dir")
        if not dist_util.is_main():
            formats = ["log"]
        else:  # training logs its numbers to progress.csv as well
            formats = ["stdout", "log", "csv"] if kind == "train" else ["stdout", "log"]
        logger.configure(dir=args.log_dir, format_strs=formats)
    return args


def explicit_flags(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> set:
    """The flag names given on the command line (as opposed to left at their defaults)."""
    probe = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            probe.add_argument(
                *action.option_strings,
                dest=action.dest,
                default=argparse.SUPPRESS,
                type=action.type,
                nargs=action.nargs,
            )
    ns, _ = probe.parse_known_args(argv)
    return set(vars(ns))


def default_log_dir() -> str:
    """``$OPENAI_LOGDIR`` or a timestamped folder in the temp dir (as the original logger)."""
    d = os.environ.get("OPENAI_LOGDIR")
    if d:
        return d
    stamp = datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f")
    return os.path.join(tempfile.gettempdir(), stamp)


def resolve_precision(args: argparse.Namespace, device: torch.device) -> None:
    """``--use_fp16`` needs a GPU (ignored with a warning elsewhere); ``--use_bf16`` runs on
    GPUs and on CPUs with native bf16 (AVX512-BF16/AMX; ignored with a warning elsewhere)."""
    ignored = []
    if getattr(args, "use_fp16", False) and device.type != "cuda":
        ignored.append("use_fp16")
    if getattr(args, "use_bf16", False) and device.type == "cpu" and not cpu_supports_fast_bf16():
        ignored.append("use_bf16")
    for flag in ignored:
        if dist_util.is_main():
            warnings.warn(
                f"--{flag} True is ignored on {device.type}: sampling in float32", stacklevel=2
            )
        setattr(args, flag, False)
    if getattr(args, "classifier_use_fp16", False) and device.type != "cuda":
        args.classifier_use_fp16 = False


# ----------------------------------------------------------------------------- bundled model


def bundled_model_meta() -> Dict[str, Any]:
    """The bundled model's metadata (``models/adm_fmnist32.json``): flags and defaults."""
    if not BUNDLED_MODEL.exists() or not BUNDLED_FLAGS.exists():
        raise UserError(
            f"the bundled model {BUNDLED_MODEL} is missing; pass --model_path PATH to an ADM "
            "checkpoint"
        )
    return json.loads(BUNDLED_FLAGS.read_text())


def bundled_model_args(model_path: str = "", **overrides: Any) -> argparse.Namespace:
    """The model and diffusion flags of the bundled model (``models/adm_fmnist32.json``) as
    a namespace for ``sample_util.load_unet``/``build_diffusion``, with ``model_path`` (a
    checkpoint of the same architecture; '' = the bundled weights) and ``overrides``."""
    flags = dict(model_and_diffusion_defaults(), **bundled_model_meta()["flags"])
    flags.update(model_path=model_path or str(BUNDLED_MODEL), **overrides)
    if not Path(flags["model_path"]).exists():
        raise UserError(f"model not found: {flags['model_path']}")
    return argparse.Namespace(**flags)


# evaluation_defaults of the bundled model that name files below the repository
_BUNDLED_DATA = ("ref_batch", "data_dir")


def _bundled_default(name: str, value: Any) -> Any:
    """A bundled default; its data files are paths below the repository, and a missing one
    is a one-line error saying how to make it."""
    if name not in _BUNDLED_DATA or not value:
        return value
    path = REPO_ROOT / value
    if not path.exists():
        raise UserError(
            f"the bundled model's --{name} {path} is missing: prepare Fashion-MNIST with "
            "'python datasets/fashion_mnist.py --out_dir data/fmnist --no_png' (make demo does "
            f"it), or pass --{name}"
        )
    return str(path)


def apply_bundled_model(
    args: argparse.Namespace, explicit: set, keys: Optional[Iterable[str]] = None
) -> bool:
    """With no ``--model_path``, use the bundled Fashion-MNIST model and its flags.

    Flags given on the command line win over the bundled ones. Returns True if applied.
    """
    if args.model_path:
        return False
    meta = bundled_model_meta()
    defaults = {**meta["flags"], **meta.get("sampling_defaults", {})}
    defaults.update(meta.get("evaluation_defaults", {}))  # its reference batch, its data
    for k in defaults if keys is None else keys:
        if k in defaults and k not in explicit and hasattr(args, k):
            setattr(args, k, _bundled_default(k, defaults[k]))
    args.model_path = str(BUNDLED_MODEL)
    dist_util.print0(
        f"no --model_path: sampling from the bundled Fashion-MNIST model {BUNDLED_MODEL} "
        f"({meta.get('description', 'see model-card.md')})"
    )
    return True


# ----------------------------------------------------------------------------- progress


class _NoBar:
    """What ``progress_bar`` returns where no bar is shown: every call does nothing."""

    n = 0
    total = 0

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(
    total: int, desc: str, *, enabled: bool = True, initial: int = 0, unit: str = "img"
):
    """A tqdm bar with rate and ETA on rank 0 when ``enabled``; a do-nothing bar elsewhere."""
    if not enabled or not dist_util.is_main():
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1
    )
