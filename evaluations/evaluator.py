"""Score a sample batch against a reference batch: IS, FID, sFID, precision and recall.

A PyTorch reimplementation of guided-diffusion's ``evaluations/evaluator.py`` that needs no
TensorFlow::

    python evaluations/evaluator.py REF_BATCH.npz SAMPLE_BATCH.npz

prints the original's lines (``Inception Score: ...``, ``FID: ...``, ``sFID: ...``,
``Precision: ...``, ``Recall: ...``). Both files hold ``arr_0``, uint8 (or float in
[0, 255]; [0, 1] with ``--float_range 0-1``) images [N, H, W, 3] of any size (grey images
as three equal channels); ``arr_0`` is streamed from the ``.npz`` in chunks, so it never has
to fit in memory. A reference batch that also holds ``mu``,
``sigma``, ``mu_s`` and ``sigma_s`` (OpenAI's ImageNet batches) supplies its FID/sFID
statistics; its ``arr_0`` is still read for precision/recall.

The math follows the original exactly (``tests/fixtures/README.md`` section 7):

- FID: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))`` with the original's
  fallback (``eps`` added to both diagonals) when the product is singular;
- Inception Score: ``exp(E_x KL(p(y|x) || p(y)))`` per split of 5000, averaged, float32;
- precision/recall: the k-NN manifold estimator of Kynkaanniemi et al. (2019), k = 3, with
  squared distances computed in float16 first and in float32 only when not finite.

In Python, :meth:`Evaluator.reference` / :meth:`Evaluator.read_reference` give a
:class:`Reference` and :meth:`Evaluator.score` the five numbers of an image array against it
(:class:`Scores`, with the sample activations); :func:`paired_bootstrap_fid` gives a
bootstrap interval of the FID difference of two sample sets drawn from the same seeds.

Bad inputs raise :class:`EvaluatorError`; the CLI prints one ``error: ...`` line and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import sys
import threading
import time
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import scipy
import scipy.linalg
import torch
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make the `evaluations` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluations import EvaluatorError  # noqa: E402
from evaluations.inception import load_inception  # noqa: E402
from guided_diffusion import io_util  # noqa: E402
from guided_diffusion.seeding import resample_counts  # noqa: E402

FEATURE_NETS = ("inception", "fmnist")
DEFAULT_FMNIST_PATH = Path(__file__).resolve().parents[1] / "models" / "fmnist_classifier.pt"
FMNIST_NOTE = (
    "note: --feature_net fmnist: these numbers use the project's Fashion-MNIST classifier "
    "and are NOT comparable with Inception-based IS/FID/sFID/precision/recall"
)
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
CACHE_FORMAT = 1
# --float_range: the value range of float images -> the factor that maps it to [0, 255]
FLOAT_RANGES = {"0-255": 1.0, "0-1": 255.0}

# ---------------------------------------------------------------------------------------
# Frechet distance and Inception Score.
# ---------------------------------------------------------------------------------------


class FIDStatistics:
    """Mean and covariance of a set of activations (one Gaussian of the FID)."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray) -> None:
        self.mu = mu
        self.sigma = sigma

    def frechet_distance(self, other: FIDStatistics, eps: float = 1e-6) -> float:
        """Frechet distance between two Gaussians (Dowson & Landau 1982; Heusel et al. 2017).

        ``d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``. As in the original,
        a singular product is retried with ``eps`` added to both diagonals, and a complex
        square root is accepted only when its diagonal is real to 1e-3 and its real part is
        used. Written against SciPy's current ``sqrtm`` API (no ``disp``).
        """
        mu1, mu2 = np.atleast_1d(self.mu), np.atleast_1d(other.mu)
        sigma1, sigma2 = np.atleast_2d(self.sigma), np.atleast_2d(other.sigma)
        if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
            raise EvaluatorError(
                f"feature dimensions differ: mean {mu1.shape} vs {mu2.shape}, "
                f"covariance {sigma1.shape} vs {sigma2.shape}"
            )
        diff = mu1 - mu2
        covmean, singular = _sqrtm_checked(sigma1.dot(sigma2))
        if singular:
            warnings.warn(
                f"fid calculation produces singular product; adding {eps} to diagonal of "
                "cov estimates",
                stacklevel=2,
            )
            offset = np.eye(sigma1.shape[0]) * eps
            covmean, _ = _sqrtm_checked((sigma1 + offset).dot(sigma2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                worst = np.max(np.abs(covmean.imag))
                raise EvaluatorError(f"FID: sqrtm has an imaginary component {worst}")
            covmean = covmean.real
        return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sqrtm_checked(a: np.ndarray) -> Tuple[np.ndarray, bool]:
    """``scipy.linalg.sqrtm(a)`` and whether the product is singular.

    Older SciPy (the original passed ``disp=False``) returned non-finite entries for a
    singular matrix; SciPy >= 1.16 returns finite values and warns "Matrix is singular"
    instead. Either signal counts. Its "ill-conditioned" warning does not: the old code
    did not fall back there either.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(a)
    flagged = any(
        issubclass(w.category, scipy.linalg.LinAlgWarning) and "singular" in str(w.message)
        for w in caught
    )
    return root, flagged or not np.isfinite(root).all()


def inception_score_from_preds(preds: np.ndarray, split_size: int = 5000) -> float:
    """Inception Score (Salimans et al. 2016) of class probabilities ``preds`` [N, K].

    ``IS = mean over splits of exp(mean_i sum_j p_ij (log p_ij - log mean_i p_ij))``, splits
    of ``split_size`` rows (the last may be shorter), computed in float32 as the original.
    Probabilities that are exactly 0 contribute 0 (the original would produce NaN).
    """
    preds = np.asarray(preds, dtype=np.float32)
    if preds.ndim != 2 or len(preds) == 0:
        raise EvaluatorError(f"Inception Score needs probabilities [N, K], got {preds.shape}")
    scores = []
    for start in range(0, len(preds), split_size):
        part = preds[start : start + split_size]
        marginal = np.mean(part, axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = part * (np.log(part) - np.log(marginal))
        kl = np.where(part > 0, kl, np.float32(0))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


# ---------------------------------------------------------------------------------------
# Bootstrap intervals of FID differences.
# ---------------------------------------------------------------------------------------


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (by ``eigh``)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


class FixedReferenceFID:
    """FID of many Gaussians against one reference, with one symmetric eigensolve each.

    With ``R = S_r^(1/2)`` (computed once), ``S_r S`` is similar to the symmetric
    ``R S R``, so ``tr((S_r S)^(1/2)) = sum_i sqrt(l_i)`` over the eigenvalues ``l_i`` of
    ``R S R`` and ``FID = |mu - mu_r|^2 + tr(S) + tr(S_r) - 2 sum_i sqrt(l_i)``: the number
    :meth:`FIDStatistics.frechet_distance` gives for a non-singular product, without a
    general ``sqrtm``. Arguments may be stacked: ``mu [..., D]``, ``sigma [..., D, D]``.
    """

    def __init__(self, ref: FIDStatistics) -> None:
        self.mu = np.atleast_1d(np.asarray(ref.mu, dtype=np.float64))
        sigma = np.atleast_2d(np.asarray(ref.sigma, dtype=np.float64))
        self.root = _sqrt_psd(sigma)  # (D, D)
        self.trace = float(np.trace(sigma))

    def __call__(self, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        rotated = self.root @ sigma @ self.root  # (..., D, D)
        return self.from_rotated(mu, np.trace(sigma, axis1=-2, axis2=-1), rotated)

    def from_rotated(
        self, mu: np.ndarray, trace_sigma: np.ndarray, rotated: np.ndarray
    ) -> np.ndarray:
        """FID from ``mu [..., D]``, ``tr(S) [...]`` and ``R S R [..., D, D]``."""
        eig = np.linalg.eigvalsh(rotated)  # (..., D), reads the lower triangle
        diff = mu - self.mu
        tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum(-1)
        return np.sum(diff * diff, -1) + trace_sigma + self.trace - 2 * tr_sqrt


def bootstrap_fids(
    ref: FIDStatistics, acts: Sequence[np.ndarray], counts: np.ndarray
) -> np.ndarray:
    """FID against ``ref`` of every activation set [N, D] of ``acts`` under every bootstrap
    resample of ``counts`` (``resample_counts``); row i of every set must come from the
    same seed, and one resample draws the same rows of every set (paired).

    :return: (num_boot, len(acts)).
    """
    fid = FixedReferenceFID(ref)
    counts = np.asarray(counts, dtype=np.float64)
    sets = []
    for x in acts:
        x = np.asarray(x, dtype=np.float64)
        if x.shape[0] != counts.shape[1]:
            raise EvaluatorError(f"{x.shape[0]} activation rows for {counts.shape[1]} counts")
        centred = x - x.mean(0)  # moments of a resample from centred rows: numerically stable
        sets.append((x.mean(0), centred, centred @ fid.root, np.sum(centred * centred, 1)))
    n = counts.shape[1]
    boot = np.empty((len(counts), len(sets)))
    for r, c in enumerate(counts):
        for k, (mean, centred, rotated, sq_norms) in enumerate(sets):
            shift = c @ centred / n  # (D,) resample mean - full mean
            weighted = rotated * np.sqrt(c)[:, None]  # (N, D)
            scatter = weighted.T @ weighted  # (D, D) = R (sum_i c_i x_i x_i^T) R
            r_shift = shift @ fid.root
            rsr = (scatter - n * np.outer(r_shift, r_shift)) / (n - 1)  # R S* R
            trace = (c @ sq_norms - n * shift @ shift) / (n - 1)  # tr(S*)
            boot[r, k] = fid.from_rotated(mean + shift, trace, rsr)
    return boot


def paired_bootstrap_fid(
    ref: FIDStatistics,
    acts_a: np.ndarray,
    acts_b: np.ndarray,
    num_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Dict[str, Any]:
    """FID(a), FID(b) and a paired bootstrap interval of FID(a) - FID(b) against ``ref``.

    Row i of ``acts_a`` and of ``acts_b`` must come from the same seed (e.g. samples at two
    ``--eps_scaler`` values from the same noise). Each of ``num_boot`` resamples draws N
    row indices with replacement and uses the same draw for both sets, so noise the two
    share cancels in the difference; the reference is held fixed. The interval is the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of the resampled differences
    (percentile interval; Efron & Tibshirani 1993, ch. 13). Point estimates are
    :meth:`FIDStatistics.frechet_distance` of the full sets; resamples use
    :class:`FixedReferenceFID`. A resample repeats rows, so its FID is biased upwards
    (by about the same amount for both sets, which cancels in the difference): per set
    only the bootstrap standard errors are reported, not intervals. Where the samples'
    distribution equals the reference's (true FID 0, a degenerate point of the FID) the
    interval is conservative; for samples that differ from the reference, as a model's
    do, its coverage is the stated level (``tests/test_evaluator.py``).

    Returns ``fid_a``, ``fid_b``, ``diff`` (``fid_a - fid_b``), ``diff_interval``
    (``[low, high]``), ``diff_std``, ``fid_a_std``, ``fid_b_std`` (bootstrap standard
    errors), ``level``, ``num_boot``, ``num_samples`` and ``seed``.
    """
    a = np.asarray(acts_a, dtype=np.float64)
    b = np.asarray(acts_b, dtype=np.float64)
    dim = np.atleast_1d(ref.mu).shape[0]
    if a.ndim != 2 or a.shape != b.shape or a.shape[1] != dim:
        raise EvaluatorError(
            f"paired bootstrap needs two activation arrays [N, {dim}] of one shape (row i of "
            f"both from the same seed), got {a.shape} and {b.shape}"
        )
    n = len(a)
    if n < 2 or num_boot < 2 or not 0 < level < 1:
        raise EvaluatorError(
            "paired bootstrap needs at least 2 samples, num_boot >= 2 and 0 < level < 1; "
            f"got {n}, {num_boot}, {level}"
        )
    # point estimates exactly as the evaluator computes them (mean in the input dtype)
    point = [
        FIDStatistics(np.mean(x, axis=0), np.cov(x, rowvar=False)).frechet_distance(ref)
        for x in (np.asarray(acts_a), np.asarray(acts_b))
    ]
    boot = bootstrap_fids(ref, [a, b], resample_counts(n, num_boot, seed)).T  # (2, num_boot)
    diffs = boot[0] - boot[1]
    q = [(1 - level) / 2, (1 + level) / 2]
    return {
        "fid_a": float(point[0]),
        "fid_b": float(point[1]),
        "diff": float(point[0] - point[1]),
        "diff_interval": [float(v) for v in np.quantile(diffs, q)],
        "diff_std": float(np.std(diffs, ddof=1)),
        "fid_a_std": float(np.std(boot[0], ddof=1)),
        "fid_b_std": float(np.std(boot[1], ddof=1)),
        "level": float(level),
        "num_boot": int(num_boot),
        "num_samples": int(n),
        "seed": int(seed),
    }


def score_sets(
    evaluator: Evaluator,
    sets: Mapping[Any, np.ndarray],
    ref: Reference,
    baseline: Any,
    num_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Dict[Any, Dict[str, Any]]:
    """The five numbers of every sample set, and the paired bootstrap interval of
    FID(set) - FID(baseline) (:func:`paired_bootstrap_fid`).

    Image i of every set must come from the same seed (e.g. one sampler at several eps
    scalers, or several samplers from the same noise). Returns ``{key: {inception_score,
    fid, sfid, precision, recall, diff, diff_interval}}`` in the order of ``sets``.
    """
    if baseline not in sets:
        raise EvaluatorError(f"the baseline {baseline!r} is not one of the sample sets")
    scores = {k: evaluator.score(images, ref) for k, images in sets.items()}
    base = scores[baseline].pool
    out = {}
    for k, s in scores.items():
        boot = paired_bootstrap_fid(ref.stats, s.pool, base, num_boot, seed, level)
        out[k] = {**s.as_dict(), "diff": boot["diff"], "diff_interval": boot["diff_interval"]}
    return out


# ---------------------------------------------------------------------------------------
# Precision and recall.
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _full_fp32() -> Iterator[None]:
    """Disable TF32 in cuDNN and matmuls (TensorFlow's graph ran in full float32)."""
    old_cudnn = torch.backends.cudnn.allow_tf32
    old_matmul = torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old_cudnn
        torch.set_float32_matmul_precision(old_matmul)


def f64_to_f16(x: torch.Tensor) -> torch.Tensor:
    """Round float64 to float16 once (torch's own cast rounds twice, via float32).

    Rounds to float32 with round-to-odd (truncate, then set the last bit if inexact); a
    second rounding from there to float16 is then correctly rounded, since float32 keeps
    more than 11 + 2 significand bits.
    """
    x32 = x.float()
    back = x32.double()
    bits = x32.view(torch.int32)
    bits = torch.where(back.abs() > x.abs(), bits - 1, bits)  # truncate towards zero
    bits = torch.where(back != x, bits | 1, bits)  # sticky bit: round to odd
    return bits.view(torch.float32).half()


class DistanceBlock:
    """Pairwise squared Euclidean distances, as the original's TensorFlow ``DistanceBlock``.

    Each call first computes ``max((|u|^2 - 2 u.v) + |v|^2, 0)`` in float16: inputs rounded
    to float16, squares rounded to float16, the row sums and ``U V^T`` accumulated in
    float64 and rounded once to float16, then ``-``, ``+`` and ``max`` as float16 ops. If any
    entry is not finite, the whole block is recomputed in float32. ``last_path`` records
    which path the latest call took (``"fp16"`` or ``"fp32"``). Runs on ``device``.
    """

    def __init__(self, device: str = "cpu", sub_rows: int = 1024) -> None:
        self.device = torch.device(device)
        self.sub_rows = sub_rows
        self.last_path: Optional[str] = None

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)

    def distances(self, u_np: np.ndarray, v_np: np.ndarray) -> torch.Tensor:
        """Distances [len(u), len(v)] as a float32 tensor on the block's device."""
        u, v = self._tensor(u_np), self._tensor(v_np)
        d16 = self._fp16_distances(u, v)
        if bool(torch.isfinite(d16).all()):
            self.last_path = "fp16"
            return d16.float()
        self.last_path = "fp32"
        with _full_fp32():
            norm_u = u.square().sum(1)
            norm_v = v.square().sum(1)
            d = (norm_u[:, None] - 2 * (u @ v.t())) + norm_v[None, :]
        return torch.clamp_min(d, 0.0)

    def _fp16_distances(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        acc = torch.float64
        u16, v16 = u.half(), v.half()
        norm_u = f64_to_f16(f64_to_f16(u16.to(acc).square()).to(acc).sum(1))  # (n1,)
        norm_v = f64_to_f16(f64_to_f16(v16.to(acc).square()).to(acc).sum(1))  # (n2,)
        v_t = v16.to(acc).t()  # (D, n2)
        out = torch.empty((len(u), len(v)), dtype=torch.float16, device=u.device)
        for s in range(0, len(u), self.sub_rows):
            uv = f64_to_f16(u16[s : s + self.sub_rows].to(acc) @ v_t)  # (rows, n2)
            d = (norm_u[s : s + self.sub_rows, None] - uv * 2) + norm_v[None, :]
            out[s : s + self.sub_rows] = torch.clamp_min(d, 0.0)
        return out

    def pairwise_distances(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Distances [len(u), len(v)] as a float32 numpy array."""
        return self.distances(u, v).cpu().numpy()

    def less_thans(
        self,
        batch_1: np.ndarray,
        radii_1: np.ndarray,
        batch_2: np.ndarray,
        radii_2: np.ndarray,
    ) -> Tuple[np.ndarray, np.ndarray]:
        """Which rows of each batch fall inside some ball of the other batch.

        Returns ``(batch_1_in [n1, K], batch_2_in [n2, K])`` with
        ``batch_1_in[i, k] = any_j d(i, j) <= radii_2[j, k]`` and
        ``batch_2_in[j, k] = any_i d(i, j) <= radii_1[i, k]``.
        """
        d = self.distances(batch_1, batch_2)  # (n1, n2)
        r1, r2 = self._tensor(radii_1), self._tensor(radii_2)
        in_1 = torch.stack([(d <= r2[None, :, k]).any(1) for k in range(r2.shape[1])], 1)
        in_2 = torch.stack([(d <= r1[:, k, None]).any(0) for k in range(r1.shape[1])], 1)
        return in_1.cpu().numpy(), in_2.cpu().numpy()


class ManifoldEstimator:
    """k-NN manifold estimate of a feature set (Kynkaanniemi et al. 2019), as the original.

    ``radii[n, j]`` is the squared distance from row n to its ``nhood_sizes[j]``-th nearest
    row, the row itself counting as the 0th. Distances come from :class:`DistanceBlock` in
    blocks of ``row_batch_size`` x ``col_batch_size``.
    """

    def __init__(
        self,
        distance_block: Optional[DistanceBlock] = None,
        row_batch_size: int = 10000,
        col_batch_size: int = 10000,
        nhood_sizes: Sequence[int] = (3,),
    ) -> None:
        self.distance_block = distance_block or DistanceBlock()
        self.row_batch_size = row_batch_size
        self.col_batch_size = col_batch_size
        self.nhood_sizes = list(nhood_sizes)

    def manifold_radii(self, features: np.ndarray) -> np.ndarray:
        """Radii [N, len(nhood_sizes)] float32 of the balls around each row of ``features``."""
        n = len(features)
        keep = max(self.nhood_sizes) + 1
        if n < keep:
            raise EvaluatorError(f"precision/recall need at least {keep} images per batch, got {n}")
        radii = np.zeros([n, len(self.nhood_sizes)], dtype=np.float32)
        for begin1 in range(0, n, self.row_batch_size):
            rows = features[begin1 : begin1 + self.row_batch_size]
            nearest = None  # (rows, <= keep) smallest distances seen so far, ascending
            for begin2 in range(0, n, self.col_batch_size):
                d = self.distance_block.distances(
                    rows, features[begin2 : begin2 + self.col_batch_size]
                )
                if nearest is not None:
                    d = torch.cat([nearest, d], 1)
                nearest = torch.topk(d, min(keep, d.shape[1]), dim=1, largest=False).values
            radii[begin1 : begin1 + len(rows)] = nearest[:, self.nhood_sizes].cpu().numpy()
        return radii

    def evaluate_pr(
        self,
        features_1: np.ndarray,
        radii_1: np.ndarray,
        features_2: np.ndarray,
        radii_2: np.ndarray,
    ) -> Tuple[np.ndarray, np.ndarray]:
        """``(precision, recall)`` arrays [K] with set 1 the reference and set 2 the samples.

        Precision is the fraction of rows of set 2 inside some ball of set 1; recall is the
        fraction of rows of set 1 inside some ball of set 2.
        """
        status_1 = np.zeros([len(features_1), radii_2.shape[1]], dtype=bool)
        status_2 = np.zeros([len(features_2), radii_1.shape[1]], dtype=bool)
        for begin1 in range(0, len(features_1), self.row_batch_size):
            end1 = begin1 + self.row_batch_size
            for begin2 in range(0, len(features_2), self.col_batch_size):
                end2 = begin2 + self.col_batch_size
                in_1, in_2 = self.distance_block.less_thans(
                    features_1[begin1:end1],
                    radii_1[begin1:end1],
                    features_2[begin2:end2],
                    radii_2[begin2:end2],
                )
                status_1[begin1:end1] |= in_1
                status_2[begin2:end2] |= in_2
        return np.mean(status_2, axis=0), np.mean(status_1, axis=0)


# ---------------------------------------------------------------------------------------
# Streaming reads of arr_0.
# ---------------------------------------------------------------------------------------


class NpzArrayReader:
    """Streams the rows of one array of a ``.npz`` (stored or deflated) or ``.npy`` file.

    The ``.npy`` header inside the zip member is parsed with ``numpy.lib.format`` and the
    data read ``chunk_rows`` rows at a time, so only one chunk is ever in memory.
    """

    def __init__(self, path: str, name: str = "arr_0") -> None:
        self.path = Path(path)
        self.name = name
        self._zip: Optional[zipfile.ZipFile] = None
        if not self.path.is_file():
            raise EvaluatorError(f"{self.path}: no such file")
        try:
            if zipfile.is_zipfile(self.path):
                self._zip = zipfile.ZipFile(self.path)
                member = f"{name}.npy"
                if member not in self._zip.namelist():
                    keys = sorted(n[:-4] for n in self._zip.namelist() if n.endswith(".npy"))
                    raise EvaluatorError(f"{self.path}: no array {name!r} (has {keys})")
                self._file = self._zip.open(member)
            elif self.path.suffix == ".npy":
                self._file = open(self.path, "rb")
            else:
                raise EvaluatorError(
                    f"{self.path}: not a valid .npz file (no zip archive; truncated?)"
                )
            self.shape, self.dtype = self._read_header()
        except EvaluatorError:
            self.close()
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError) as exc:
            self.close()
            raise EvaluatorError(f"{self.path}: corrupt or unreadable .npz ({exc})") from None

    def _read_header(self) -> Tuple[Tuple[int, ...], np.dtype]:
        version = np.lib.format.read_magic(self._file)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(self._file)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(self._file)
        else:
            raise EvaluatorError(f"{self.path}: unsupported .npy format version {version}")
        if fortran_order and len(shape) > 1:
            raise EvaluatorError(
                f"{self.path}: {self.name} is stored in Fortran order; save a C-contiguous array"
            )
        return tuple(shape), dtype

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def read_batches(self, chunk_rows: int) -> Iterator[np.ndarray]:
        """Yield consecutive row chunks [<= chunk_rows, ...] of the array."""
        row_items = int(np.prod(self.shape[1:], dtype=np.int64))
        row_bytes = row_items * self.dtype.itemsize
        for start in range(0, len(self), chunk_rows):
            rows = min(chunk_rows, len(self) - start)
            out = np.empty((rows,) + self.shape[1:], dtype=self.dtype)
            view = memoryview(out.reshape(-1).view(np.uint8))
            filled = 0
            try:
                while filled < rows * row_bytes:
                    got = self._file.readinto(view[filled:])
                    if not got:
                        raise EvaluatorError(
                            f"{self.path}: {self.name} is truncated at row {start}"
                        )
                    filled += got
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
                raise EvaluatorError(f"{self.path}: corrupt {self.name} data ({exc})") from None
            yield out

    def close(self) -> None:
        """Close the member and the archive."""
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self) -> NpzArrayReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_image_batch(path: str, min_images: int = 1) -> NpzArrayReader:
    """Open ``arr_0`` of ``path`` and check it is an image batch [N, H, W, 3].

    Accepts uint8, or floating point (its values are checked as it streams, see
    :class:`ValueRange`); needs ``min_images`` rows.
    """
    reader = NpzArrayReader(path, "arr_0")
    shape, dtype = reader.shape, reader.dtype
    problem = None
    if dtype != np.uint8 and not (dtype.kind == "f" and dtype.itemsize <= 8):
        problem = f"arr_0 has dtype {dtype}; expected uint8 (or float in [0, 255])"
    elif len(shape) in (3, 4) and (len(shape) == 3 or shape[3] == 1):
        problem = (
            f"arr_0 has shape {shape}; expected images [N, H, W, 3]: store grey images as "
            "three equal channels (np.repeat(x[..., None] if x.ndim == 3 else x, 3, axis=3))"
        )
    elif len(shape) != 4 or shape[3] != 3 or shape[1] < 1 or shape[2] < 1:
        problem = f"arr_0 has shape {shape}; expected images [N, H, W, 3]"
    elif shape[0] < min_images:
        problem = f"arr_0 holds {shape[0]} images; at least {min_images} are needed"
    if problem:
        reader.close()
        raise EvaluatorError(f"{path}: {problem}")
    return reader


class ValueRange:
    """Running min/max of image chunks: refuses NaN/inf and floats outside the expected range.

    uint8 images always fit. Float images must lie in [0, 255] (``float_range="0-255"``,
    the original's convention) or in [0, 1] (``"0-1"``, scaled by 255 before the network).
    With ``"0-255"`` a whole array inside [0, 1] is refused too: it would be scored as
    near-black images without complaint (FID in the hundreds, precision 0). ``update``
    raises as soon as a chunk leaves the range; ``check(final=True)`` after the last chunk.
    Messages are one line naming ``source``, the range found and the fix.
    """

    def __init__(self, source: str, float_range: str = "0-255") -> None:
        if float_range not in FLOAT_RANGES:
            raise EvaluatorError(f"float_range must be one of {sorted(FLOAT_RANGES)}")
        self.source = source
        self.float_range = float_range
        self.lo, self.hi = np.inf, -np.inf
        self.rows = 0
        self.is_float = False

    def update(self, chunk: np.ndarray, check: bool = True) -> None:
        """Add a chunk [B, H, W, 3]; with ``check``, raise at once if the range is left."""
        start, self.rows = self.rows, self.rows + len(chunk)
        if chunk.dtype.kind != "f" or chunk.size == 0:
            return
        self.is_float = True
        lo, hi = float(chunk.min()), float(chunk.max())  # NaN propagates; inf shows as inf
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise EvaluatorError(
                f"{self.source}: arr_0 contains NaN or inf (rows {start}..{self.rows - 1})"
            )
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        if check:
            self.check(final=False)

    def check(self, final: bool = True) -> None:
        """Raise if the values seen so far are out of range (``final``: also a [0, 1] array
        when [0, 255] is expected)."""
        if not self.is_float:
            return
        found = f"{self.source}: float images in [{self.lo:.2f}, {self.hi:.2f}]"
        if self.float_range == "0-1":
            if self.lo < 0 or self.hi > 1:
                raise EvaluatorError(
                    f"{found}; --float_range 0-1 expects floats in [0, 1] (uint8 or floats in "
                    "[0, 255] need the default --float_range 0-255)"
                )
            return
        expected = "the evaluator expects uint8 or floats in [0, 255]"
        if self.lo >= -1 and self.hi <= 1 and self.lo < 0:
            raise EvaluatorError(f"{found}; {expected}: map [-1, 1] with (x + 1) * 127.5")
        if self.lo < 0 or self.hi > 255:
            raise EvaluatorError(f"{found}; {expected}: clip or rescale the images")
        if final and self.hi <= 1:
            raise EvaluatorError(
                f"{found}; {expected}: multiply by 255 (or pass --float_range 0-1)"
            )


def check_float_values(path: str, source: str, float_range: str = "0-255") -> None:
    """Scan a float ``arr_0`` of ``path`` once for :class:`ValueRange` (fail fast before the
    network runs); uint8 batches need no scan."""
    with open_image_batch(path) as reader:
        if reader.dtype.kind != "f":
            return
        values = ValueRange(source, float_range)
        row_bytes = max(1, int(np.prod(reader.shape[1:])) * reader.dtype.itemsize)
        for chunk in reader.read_batches(max(1, 2**26 // row_bytes)):  # ~64 MB per chunk
            values.update(chunk, check=False)
        values.check(final=True)


def _prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate ``items`` in a background thread (decompression overlaps the network)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer, re-raised there
            put(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------------------------------
# Feature networks and the evaluator.
# ---------------------------------------------------------------------------------------


def default_device() -> str:
    """``cuda`` when available, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_feature_net(
    name: str = "inception",
    device: str = "cpu",
    inception_path: Optional[str] = None,
    fmnist_path: Optional[str] = None,
) -> torch.nn.Module:
    """Load the feature network ``name`` (``inception`` or ``fmnist``) in eval mode.

    A feature network maps float images [N, 3, H, W] in [0, 255] to ``(pool, spatial)``
    features and has ``logits(pool)``, ``name``, ``pool_dim``, ``spatial_dim``,
    ``feature_layout`` (a description that changes when the features do), ``fingerprint``
    (of the weights) and ``comparable_with_inception``.
    """
    if name == "inception":
        return load_inception(inception_path, device=device)
    if name == "fmnist":
        from evaluations.fmnist_net import load_fmnist_net

        return load_fmnist_net(fmnist_path or DEFAULT_FMNIST_PATH, device=device)
    raise EvaluatorError(f"unknown feature net {name!r}; choose from {FEATURE_NETS}")


@dataclass
class Reference:
    """What samples are scored against: the reference pool activations [N, P] (for
    precision/recall) and the pool and spatial statistics (FID, sFID)."""

    pool: np.ndarray
    stats: FIDStatistics
    stats_spatial: FIDStatistics
    source: str = "computed"  # "computed", "ref_batch" (precomputed mu/sigma) or "cache"


@dataclass
class Scores:
    """The evaluator's five numbers for one sample set, and its pool activations [N, P]
    (the input of :func:`paired_bootstrap_fid`)."""

    inception_score: float
    fid: float
    sfid: float
    precision: float
    recall: float
    pool: np.ndarray

    def as_dict(self) -> Dict[str, float]:
        """The five numbers, keyed as in the CLI's ``--json``."""
        keys = ("inception_score", "fid", "sfid", "precision", "recall")
        return {k: float(getattr(self, k)) for k in keys}


class Evaluator:
    """Computes activations and metrics with a feature network (the original's ``Evaluator``).

    Activations are pairs ``(pool [N, P], spatial [N, S])`` of float32 numpy arrays
    (``pool_3`` and ``mixed_6/conv`` for Inception). Images are uint8 [N, H, W, 3] or float
    in ``float_range`` (``"0-255"``, or ``"0-1"`` scaled by 255), checked by
    :class:`ValueRange`. Scripts compose :meth:`reference` (or :meth:`read_reference`) and
    :meth:`score`.
    """

    def __init__(
        self,
        feature_net: torch.nn.Module,
        batch_size: int = 64,
        softmax_batch_size: int = 512,
        device: Optional[str] = None,
        progress: bool = True,
        float_range: str = "0-255",
    ) -> None:
        if float_range not in FLOAT_RANGES:
            raise EvaluatorError(f"float_range must be one of {sorted(FLOAT_RANGES)}")
        self.device = torch.device(device or default_device())
        self.net = feature_net.to(self.device).eval()
        self.batch_size = batch_size
        self.softmax_batch_size = softmax_batch_size
        self.progress = progress
        self.float_range = float_range
        self.manifold_estimator = ManifoldEstimator(DistanceBlock(str(self.device)))

    def warmup(self) -> None:
        """Run one small batch so that one-time setup happens before the timed work."""
        progress, self.progress = self.progress, False
        try:
            self.compute_activations([np.zeros([2, 32, 32, 3], dtype=np.uint8)])
        finally:
            self.progress = progress

    def read_activations(self, npz_path: str) -> Tuple[np.ndarray, np.ndarray]:
        """Activations of the images in ``arr_0`` of ``npz_path``, streamed in batches."""
        with open_image_batch(npz_path) as reader:
            batches = _prefetch(reader.read_batches(self.batch_size))
            return self.compute_activations(batches, total=len(reader), source=npz_path)

    def compute_activations(
        self, batches: Iterable[np.ndarray], total: Optional[int] = None, source: str = "images"
    ) -> Tuple[np.ndarray, np.ndarray]:
        """Activations of image batches [B, H, W, 3] (uint8, or float in ``float_range``).

        Values are checked by :class:`ValueRange` as the batches pass (``source`` names
        them in errors).
        """
        values = ValueRange(source, self.float_range)
        scale = FLOAT_RANGES[self.float_range]
        pools: List[np.ndarray] = []
        spatials: List[np.ndarray] = []
        bar = tqdm(total=total, unit="img", disable=not self.progress, dynamic_ncols=True)
        with bar, torch.inference_mode(), _full_fp32():
            for batch in batches:
                values.update(batch)
                batch = np.ascontiguousarray(batch, dtype=batch.dtype.newbyteorder("="))
                x = torch.from_numpy(batch).to(self.device)
                x = x.permute(0, 3, 1, 2).float()  # (B, 3, H, W)
                if batch.dtype.kind == "f" and scale != 1:
                    x = x * scale  # [0, 1] -> [0, 255]
                pool, spatial = self.net(x)
                pools.append(pool.reshape(len(x), -1).cpu().numpy())
                spatials.append(spatial.reshape(len(x), -1).cpu().numpy())
                bar.update(len(x))
        values.check(final=True)
        return np.concatenate(pools, axis=0), np.concatenate(spatials, axis=0)

    def _image_batches(self, images: np.ndarray, what: str) -> Iterator[np.ndarray]:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[3] != 3 or len(images) == 0:
            raise EvaluatorError(
                f"{what}: expected images [N, H, W, 3] (grey as three equal channels), got "
                f"{images.dtype} {images.shape}"
            )
        if images.dtype != np.uint8 and images.dtype.kind != "f":
            raise EvaluatorError(f"{what}: dtype {images.dtype}; expected uint8 or float")
        return (images[i : i + self.batch_size] for i in range(0, len(images), self.batch_size))

    def reference(self, images: np.ndarray) -> Reference:
        """The :class:`Reference` of an image array [N, H, W, 3] held in memory."""
        pool, spatial = self.compute_activations(
            self._image_batches(images, "reference images"),
            total=len(images),
            source="reference images",
        )
        return Reference(pool, self.compute_statistics(pool), self.compute_statistics(spatial))

    def read_reference(self, npz_path: str) -> Reference:
        """The :class:`Reference` of a reference batch ``.npz`` (streamed; its precomputed
        ``mu, sigma, mu_s, sigma_s`` are used when present, as the CLI does)."""
        acts = self.read_activations(npz_path)
        stats, stats_spatial = self.read_statistics(npz_path, acts)
        source = "ref_batch" if _has_member(npz_path, "mu.npy") else "computed"
        return Reference(acts[0], stats, stats_spatial, source)

    def score(self, images: np.ndarray, ref: Reference) -> Scores:
        """IS, FID, sFID, precision and recall of an image array [N, H, W, 3] against
        ``ref``, as the CLI computes them (the CLI streams files; this takes arrays)."""
        acts = self.compute_activations(
            self._image_batches(images, "sample images"), total=len(images), source="samples"
        )
        return self.score_activations(acts, ref)

    def score_activations(
        self,
        activations: Tuple[np.ndarray, np.ndarray],
        ref: Reference,
        stats: Optional[Tuple[FIDStatistics, FIDStatistics]] = None,
    ) -> Scores:
        """:class:`Scores` of sample activations ``(pool, spatial)`` against ``ref``;
        ``stats`` overrides the sample statistics (precomputed in a sample batch)."""
        pool, spatial = activations
        if stats is None:
            stats = (self.compute_statistics(pool), self.compute_statistics(spatial))
        precision, recall = self.compute_prec_recall(ref.pool, pool)
        return Scores(
            inception_score=self.compute_inception_score(pool),
            fid=stats[0].frechet_distance(ref.stats),
            sfid=stats[1].frechet_distance(ref.stats_spatial),
            precision=precision,
            recall=recall,
            pool=pool,
        )

    def read_statistics(
        self, npz_path: str, activations: Tuple[np.ndarray, Optional[np.ndarray]]
    ) -> Tuple[FIDStatistics, FIDStatistics]:
        """``(pool, spatial)`` statistics: ``mu, sigma, mu_s, sigma_s`` from ``npz_path`` if
        it holds them, else computed from ``activations``."""
        stats = read_precomputed_statistics(npz_path)
        if stats is None:
            if activations[1] is None:
                raise EvaluatorError(f"{npz_path}: spatial activations are missing")
            stats = tuple(self.compute_statistics(a) for a in activations)
        self.check_statistics(npz_path, stats)
        return stats

    def check_statistics(self, source: str, stats: Sequence[FIDStatistics]) -> None:
        """Raise if statistics do not match this feature network's dimensions."""
        for stat, dim, what in zip(
            stats, (self.net.pool_dim, self.net.spatial_dim), ("pool", "spatial")
        ):
            mu, sigma = np.asarray(stat.mu), np.asarray(stat.sigma)
            if mu.shape != (dim,) or sigma.shape != (dim, dim):
                raise EvaluatorError(
                    f"{source}: {what} statistics have shapes {mu.shape}, {sigma.shape}, but "
                    f"feature net {self.net.name!r} gives {dim} features"
                )

    def compute_statistics(self, activations: np.ndarray) -> FIDStatistics:
        """Mean (in the activations' dtype) and covariance (float64) of [N, D] activations."""
        return FIDStatistics(np.mean(activations, axis=0), np.cov(activations, rowvar=False))

    def compute_inception_score(self, activations: np.ndarray, split_size: int = 5000) -> float:
        """Inception Score of pool activations via the net's softmax head."""
        preds = []
        with torch.inference_mode(), _full_fp32():
            for start in range(0, len(activations), self.softmax_batch_size):
                acts = torch.from_numpy(activations[start : start + self.softmax_batch_size])
                logits = self.net.logits(acts.to(self.device))
                preds.append(torch.softmax(logits, dim=1).cpu().numpy())
        return inception_score_from_preds(np.concatenate(preds, axis=0), split_size=split_size)

    def compute_prec_recall(
        self, activations_ref: np.ndarray, activations_sample: np.ndarray
    ) -> Tuple[float, float]:
        """``(precision, recall)`` of the samples against the reference, k = 3."""
        if activations_ref.shape[1:] != activations_sample.shape[1:]:
            raise EvaluatorError(
                f"feature dimensions differ: reference {activations_ref.shape[1:]} vs "
                f"samples {activations_sample.shape[1:]}"
            )
        radii_1 = self.manifold_estimator.manifold_radii(activations_ref)
        radii_2 = self.manifold_estimator.manifold_radii(activations_sample)
        pr = self.manifold_estimator.evaluate_pr(
            activations_ref, radii_1, activations_sample, radii_2
        )
        return float(pr[0][0]), float(pr[1][0])


def _has_member(path: str, member: str) -> bool:
    """Whether ``path`` is a zip archive (.npz) holding ``member``."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return member in zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise EvaluatorError(f"{path}: corrupt .npz ({exc})") from None


def read_precomputed_statistics(npz_path: str) -> Optional[Tuple[FIDStatistics, FIDStatistics]]:
    """``(FIDStatistics(mu, sigma), FIDStatistics(mu_s, sigma_s))`` stored in ``npz_path``,
    or None when it holds no ``mu``."""
    if not _has_member(npz_path, "mu.npy"):
        return None
    try:
        with np.load(npz_path, allow_pickle=False) as obj:
            missing = [k for k in STAT_KEYS if k not in obj.files]
            if missing:
                raise EvaluatorError(f"{npz_path}: has 'mu' but lacks {missing}")
            arrays = {k: np.asarray(obj[k]) for k in STAT_KEYS}
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError) as exc:
        raise EvaluatorError(f"{npz_path}: cannot read statistics ({exc})") from None
    for key, value in arrays.items():
        if value.dtype.kind != "f" or not np.isfinite(value).all():
            raise EvaluatorError(f"{npz_path}: {key} must be finite floats")
    return (
        FIDStatistics(arrays["mu"], arrays["sigma"]),
        FIDStatistics(arrays["mu_s"], arrays["sigma_s"]),
    )


# ---------------------------------------------------------------------------------------
# Reference statistics cache.
# ---------------------------------------------------------------------------------------


def _ref_identity(ref_path: str, net: torch.nn.Module) -> Dict[str, Any]:
    """What a cache must match: the feature net and the reference file's content.

    Zip members carry a CRC-32 of their data, which identifies the content for free; a
    ``.npy`` file is identified by its size and modification time.
    """
    path = Path(ref_path)
    ident: Dict[str, Any] = {
        "format": CACHE_FORMAT,
        "feature_net": net.name,
        "feature_layout": net.feature_layout,
        "feature_net_fingerprint": net.fingerprint,
        "ref_size": path.stat().st_size,
    }
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            ident["ref_crc32"] = {i.filename: i.CRC for i in zf.infolist()}
    else:
        ident["ref_mtime_ns"] = path.stat().st_mtime_ns
    return ident


def load_ref_cache(cache_path: str, ident: Dict[str, Any]) -> Optional[Reference]:
    """The :class:`Reference` stored in a matching cache, else None."""
    path = Path(cache_path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["identity"])) != ident:
                print(f"reference statistics cache {path} does not match; recomputing", flush=True)
                return None
            return Reference(
                z["pool"],
                FIDStatistics(z["mu"], z["sigma"]),
                FIDStatistics(z["mu_s"], z["sigma_s"]),
                source="cache",
            )
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError) as exc:
        print(f"reference statistics cache {path} is unreadable ({exc}); recomputing", flush=True)
        return None


def save_ref_cache(cache_path: str, ident: Dict[str, Any], ref: Reference) -> None:
    """Write the cache atomically (``io_util.save_npz_atomic``; its folder must exist)."""
    io_util.save_npz_atomic(
        cache_path,
        identity=np.array(json.dumps(ident)),
        pool=ref.pool,
        mu=ref.stats.mu,
        sigma=ref.stats.sigma,
        mu_s=ref.stats_spatial.mu,
        sigma_s=ref.stats_spatial.sigma,
    )


def check_output_file(path: str, flag: str) -> None:
    """Refuse an output file whose folder is missing (none is created) or that is a folder."""
    try:
        io_util.ensure_parent(path, flag)
    except OSError as exc:  # FileNotFoundError / NotADirectoryError, one line each
        raise EvaluatorError(str(exc)) from None
    if Path(path).is_dir():
        raise EvaluatorError(f"{flag} {path} is a folder; pass a file path such as {path}/x.npz")


# ---------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------


def create_argparser() -> argparse.ArgumentParser:
    """The CLI contract; every flag has help text."""
    p = argparse.ArgumentParser(
        description="Score SAMPLE_BATCH against REF_BATCH: Inception Score, FID, sFID, "
        "precision and recall (guided-diffusion's evaluator without TensorFlow)."
    )
    p.add_argument(
        "ref_batch",
        help="reference batch .npz: arr_0 images [N, H, W, 3] uint8, "
        "optionally mu/sigma/mu_s/sigma_s precomputed statistics",
    )
    p.add_argument("sample_batch", help="sample batch .npz: arr_0 images [N, H, W, 3] uint8")
    p.add_argument(
        "--feature_net",
        choices=FEATURE_NETS,
        default="inception",
        help="feature network: 'inception' (the FID Inception-v3, comparable with "
        "published numbers) or 'fmnist' (the bundled offline Fashion-MNIST "
        "classifier; NOT comparable with Inception-based numbers)",
    )
    p.add_argument(
        "--inception_path",
        default=None,
        help="path of pt_inception-2015-12-05-6726825d.pth (default: "
        "$ADM_ES_CACHE or ~/.cache/adm_es/, downloaded there when missing)",
    )
    p.add_argument(
        "--fmnist_path",
        default=str(DEFAULT_FMNIST_PATH),
        help="state dict of the Fashion-MNIST feature net (--feature_net fmnist)",
    )
    p.add_argument(
        "--ref_stats_cache",
        default=None,
        help="npz file caching the reference activations and statistics: reused "
        "when it matches REF_BATCH and the feature net, (re)written otherwise",
    )
    p.add_argument(
        "--batch_size",
        type=int,
        default=64,
        help="images per forward pass (also the streaming chunk size)",
    )
    p.add_argument(
        "--float_range",
        choices=sorted(FLOAT_RANGES),
        default="0-255",
        help="value range of float arr_0 images: '0-255' (the original's convention; "
        "float images inside [0, 1] are refused) or '0-1' (multiplied by 255); uint8 "
        "images are unaffected",
    )
    p.add_argument(
        "--device",
        default=default_device(),
        help="torch device (default: cuda if available, else cpu)",
    )
    p.add_argument(
        "--json",
        default=None,
        help="also write the five numbers and run metadata to this JSON file",
    )
    p.add_argument("--no_progress", action="store_true", help="hide the progress bars (stderr)")
    return p


def _check_device(name: str) -> str:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise EvaluatorError(f"bad --device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluatorError(f"--device {name}: CUDA is not available")
    return str(device)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Evaluate as the CLI does; print the original's lines and return the results dict."""
    t0 = time.time()
    if args.batch_size < 1:
        raise EvaluatorError("--batch_size must be positive")
    device = _check_device(args.device)
    for path, flag in ((args.ref_stats_cache, "--ref_stats_cache"), (args.json, "--json")):
        if path:
            check_output_file(path, flag)
    k_plus_1 = 4  # nhood size 3 plus the row itself
    shapes = {}
    for role, path in (("reference batch", args.ref_batch), ("sample batch", args.sample_batch)):
        with open_image_batch(path, min_images=k_plus_1) as reader:  # fail fast on bad input
            shapes[role] = reader.shape
        check_float_values(path, f"{role} {path}", args.float_range)
    net = load_feature_net(
        args.feature_net, device, inception_path=args.inception_path, fmnist_path=args.fmnist_path
    )
    evaluator = Evaluator(
        net,
        batch_size=args.batch_size,
        device=device,
        progress=not args.no_progress,
        float_range=args.float_range,
    )

    print("warming up the feature network...", flush=True)
    evaluator.warmup()

    ref = None
    if args.ref_stats_cache:
        ident = _ref_identity(args.ref_batch, net)
        ref = load_ref_cache(args.ref_stats_cache, ident)
    if ref is not None:
        print(f"reading reference batch activations from {args.ref_stats_cache}...", flush=True)
        evaluator.check_statistics(args.ref_stats_cache, (ref.stats, ref.stats_spatial))
    else:
        print("computing reference batch activations...", flush=True)
        ref_acts = evaluator.read_activations(args.ref_batch)
        print("computing/reading reference batch statistics...", flush=True)
        ref_stats = evaluator.read_statistics(args.ref_batch, ref_acts)
        source = "ref_batch" if _has_member(args.ref_batch, "mu.npy") else "computed"
        ref = Reference(ref_acts[0], *ref_stats, source=source)
        if args.ref_stats_cache:
            save_ref_cache(args.ref_stats_cache, ident, ref)

    print("computing sample batch activations...", flush=True)
    sample_acts = evaluator.read_activations(args.sample_batch)
    print("computing/reading sample batch statistics...", flush=True)
    sample_stats = evaluator.read_statistics(args.sample_batch, sample_acts)

    print("Computing evaluations...", flush=True)
    if not net.comparable_with_inception:
        print(FMNIST_NOTE, flush=True)
    scores = evaluator.score_activations(sample_acts, ref, sample_stats)
    results: Dict[str, Any] = scores.as_dict()
    print("Inception Score:", results["inception_score"], flush=True)
    print("FID:", results["fid"], flush=True)
    print("sFID:", results["sfid"], flush=True)
    print("Precision:", results["precision"], flush=True)
    print("Recall:", results["recall"], flush=True)

    results["metadata"] = {
        "ref_batch": str(Path(args.ref_batch).resolve()),
        "sample_batch": str(Path(args.sample_batch).resolve()),
        "num_ref": shapes["reference batch"][0],
        "num_samples": shapes["sample batch"][0],
        "ref_shape": list(shapes["reference batch"]),
        "sample_shape": list(shapes["sample batch"]),
        "ref_stats_source": ref.source,
        "feature_net": net.name,
        "feature_net_fingerprint": net.fingerprint,
        "comparable_with_inception_fid": bool(net.comparable_with_inception),
        "nhood_size": 3,
        "is_split_size": 5000,
        "float_range": args.float_range,
        "device": device,
        "batch_size": args.batch_size,
        "seconds": round(time.time() - t0, 3),
        "versions": {
            "torch": torch.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
        },
    }
    if args.json:
        io_util.atomic_write_bytes((json.dumps(results, indent=2) + "\n").encode(), args.json)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; bad input prints one ``error: ...`` line and returns 2."""
    args = create_argparser().parse_args(argv)
    try:
        run(args)
    except EvaluatorError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
