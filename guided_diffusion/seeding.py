"""Reproducible seeds: one derivation for every random stream of the project.

Every stream is keyed by a tuple of non-negative integers (the run's ``--seed`` and where
the draw happens: a sample batch, a sample, a training step on a rank, a stream number), so
a result depends on those keys only, never on the number of processes, the batch it was
drawn in or an interruption (EDM's per-image generators; DiT's per-rank seeds).
"""

from __future__ import annotations

from typing import Iterable, List, Union

import numpy as np
import torch

SEED_BITS = 63  # torch.Generator.manual_seed takes non-negative 64-bit values; keep the sign bit


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys (``numpy.random.SeedSequence``).

    ``derive_seed(seed, j)`` is the seed of global sample batch ``j``; each caller documents
    its keys. Keys must be non-negative integers.
    """
    words = [int(k) for k in keys]
    if any(k < 0 for k in words):
        raise ValueError(f"seed keys must be non-negative integers, got {keys}")
    state = np.random.SeedSequence(words).generate_state(2)
    return int((int(state[0]) << 32 | int(state[1])) & ((1 << SEED_BITS) - 1))


def batch_seed(seed: int, index: int) -> int:
    """The seed of global batch (or sample) ``index`` of a run seeded with ``--seed seed``."""
    return derive_seed(int(seed) & 0xFFFFFFFF, index)


def sample_seeds(seed: int, indices: Iterable[int]) -> List[int]:
    """One seed per sample, from the run seed and each sample's global index."""
    return [batch_seed(seed, j) for j in indices]


def stream_seed(sample_seed: int, stream: int) -> int:
    """The seed of numbered stream ``stream`` of one sample (e.g. its x_T vs its data noise)."""
    return derive_seed(int(sample_seed) & ((1 << SEED_BITS) - 1), 0xE5, stream)


def step_seed(seed: int, rank: int, step: int, stream: int = 0) -> int:
    """The seed of training step ``step`` on ``rank`` (``stream`` separates uses)."""
    return derive_seed(seed, rank, step, stream)


def make_generator(seed: int, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(int(seed))


def resample_counts(n: int, num_boot: int, seed: int = 0) -> np.ndarray:
    """(num_boot, n) bootstrap counts as float64: row r says how often each of n rows is
    drawn by n draws with replacement (``numpy.random.default_rng(seed)``, one
    ``integers`` call per row). One draw applied to several sets of rows from the same seeds
    gives paired resamples."""
    rng = np.random.default_rng(seed)
    counts = np.empty((num_boot, n))
    for r in range(num_boot):
        counts[r] = np.bincount(rng.integers(0, n, size=n), minlength=n)
    return counts
