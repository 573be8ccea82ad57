"""Sample sets from the same seeds, scored against one reference: the engine of
``scripts/demo.py`` (an eps_scaler sweep) and ``scripts/compare_samplers.py`` (samplers and
exposure-bias fixes side by side).

A set is a named (diffusion, sampling options) pair. Image i of every set comes from the
same global seed (``sample_util``'s batch seeds), so two sets differ through their settings
alone, and the paired bootstrap interval of FID(set) - FID(baseline) over those seeds
(``evaluations.evaluator.score_sets``) is much tighter than the noise of either FID. Each
set is sampled into ``run_dir/<name>/`` by ``sample_util.sample_images`` and resumes like
``image_sample.py`` after an interruption.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .calibration import CalibrationResult, calibrate
from .io_util import PathLike, write_json_atomic
from .sample_util import SamplingOptions, sample_images

# the columns of a score table: (key, header, format)
COLUMNS = (
    ("fid", "FID", "{:.2f}"),
    ("diff", "FID - base [95% CI]", None),
    ("sfid", "sFID", "{:.2f}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
)


@dataclass(frozen=True)
class SampleSet:
    """One set: ``name`` (its folder and table label), the sampling ``diffusion`` (with its
    eps scaler) and the loop ``options`` (sampler, eta, time shift)."""

    name: str
    diffusion: Any
    options: SamplingOptions = SamplingOptions()


# the methods of compare_samplers.py: name -> (loop options, uses the eps scaler b)
METHODS: Dict[str, Tuple[SamplingOptions, bool]] = {
    "adm": (SamplingOptions(), False),  # DDPM (Ho et al. 2020), the ADM baseline
    "es": (SamplingOptions(), True),  # ADM-ES (Ning et al. 2024)
    "ts": (SamplingOptions(time_shift=True), False),  # TS-DPM (Li et al. 2024)
    "ts_es": (SamplingOptions(time_shift=True), True),
    "ddim": (SamplingOptions(sampler="ddim"), False),  # Song et al. 2021, eta 0
    "ddim_eta1": (SamplingOptions(sampler="ddim", eta=1.0), False),
    "dpmpp2m": (SamplingOptions(sampler="dpmpp2m"), False),  # Lu et al. 2022
    "dpmpp2m_es": (SamplingOptions(sampler="dpmpp2m"), True),
}


def method_sets(
    diffusion: Any, methods: Sequence[str], b: float, prefix: str = "", **time_shift: int
) -> List[SampleSet]:
    """One ``SampleSet`` per method of ``METHODS`` on ``diffusion`` (the *_es ones with eps
    scaler ``b``), named ``prefix + method``; ``time_shift`` sets ts_cutoff/ts_window."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}: choose among {sorted(METHODS)}")
    sets = []
    for m in methods:
        options, scaled = METHODS[m]
        options = SamplingOptions(**{**options.__dict__, **time_shift})
        sets.append(SampleSet(prefix + m, diffusion.with_eps_scaler(b if scaled else 1.0), options))
    return sets


def sample_sets(
    model: Callable[..., torch.Tensor],
    sets: Sequence[SampleSet],
    *,
    run_dir: PathLike,
    num_samples: int,
    batch_size: int,
    shape: Sequence[int],
    seed: int,
    device: torch.device,
    num_classes: Optional[int] = None,
    progress: bool = True,
) -> Dict[str, np.ndarray]:
    """``{name: uint8 images [num_samples, H, W, 3]}``, every set from the same seeds."""
    images = {}
    for s in sets:
        path = sample_images(
            model,
            s.diffusion,
            log_dir=str(Path(run_dir) / s.name),
            num_samples=num_samples,
            batch_size=batch_size,
            shape=shape,
            seed=seed,
            device=device,
            options=s.options,
            num_classes=num_classes,
            progress=progress,
        )
        with np.load(path) as z:
            images[s.name] = z["arr_0"]
    return images


def grid_path(run_dir: PathLike, name: str, num_samples: int, image_size: int) -> Path:
    """The PNG grid of the first 64 images of set ``name`` (written by ``sample_images``)."""
    return Path(run_dir) / name / f"samples_{num_samples}x{image_size}x{image_size}x3.png"


def _cell(row: Dict[str, Any], key: str, fmt: Optional[str]) -> str:
    if fmt is not None:
        return fmt.format(row[key])
    lo, hi = row["diff_interval"]
    return f"{row['diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def format_table(rows: List[Dict[str, Any]], label: str = "set", markdown: bool = False) -> str:
    """A score table: one row per set (``name`` and the ``score_sets`` numbers), as aligned
    text or as Markdown."""
    header = [label] + [h for _, h, _ in COLUMNS]
    body = [[str(r["name"])] + [_cell(r, k, f) for k, _, f in COLUMNS] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    return "\n".join(
        "  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [header, *body]
    )


def load_or_calibrate(
    path: PathLike,
    model: Callable[..., torch.Tensor],
    diffusion: Any,
    inputs: Callable[[], Tuple[torch.Tensor, Optional[dict], Sequence[int]]],
    **options: Any,
) -> CalibrationResult:
    """The calibration saved at ``path`` (JSON), or a new one written there.

    ``inputs()`` returns ``(x0, model_kwargs, seeds)`` (only called when calibrating);
    ``options`` go to :func:`calibrate`. Lets a long job resume without recalibrating.
    """
    path = Path(path)
    if path.exists():
        return CalibrationResult.from_json(json.loads(path.read_text()))
    x0, model_kwargs, seeds = inputs()
    result = calibrate(model, diffusion, x0, seeds=seeds, model_kwargs=model_kwargs, **options)
    write_json_atomic(path, result.to_json())
    return result
