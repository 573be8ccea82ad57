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

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .io_util import PathLike
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
