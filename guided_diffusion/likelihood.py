"""Likelihood evaluation: bits per dimension of a dataset under a diffusion model.

The bound is ``GaussianDiffusion.calc_bpd_loop`` (Ho et al. 2020, Eq. 5; Nichol & Dhariwal
2021, Sec. 2): the prior term at t = T plus one KL (or decoder NLL) term per step. Epsilon
Scaling is applied as in the original ADM-ES code: ``_vb_terms_bpd`` goes through
``p_mean_variance``, which divides eps by lambda_i, so ``--eps_scaler`` b != 1 evaluates the
bound of the scaled reverse process; b = 1 (k = 0) is the plain ADM bound.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Tuple

import numpy as np
import torch

from . import dist_util, logger
from .seeding import make_generator, step_seed

Batch = Tuple[torch.Tensor, Dict[str, torch.Tensor]]
TERMS = ("vb", "mse", "xstart_mse")


def run_bpd_evaluation(
    model: Callable,
    diffusion,
    data: Iterator[Batch],
    num_samples: int,
    clip_denoised: bool = True,
    seed: int = 0,
) -> Dict[str, np.ndarray]:
    """Bits per dimension of the data under the model (``calc_bpd_loop``), over all ranks.

    Whole batches are evaluated until at least ``num_samples`` images (over all ranks) are
    done; every rank must hold the same batch size. The noise of rank ``r`` comes from a
    generator seeded with ``step_seed(seed, r, 0)``.

    :return: ``bpd`` (mean total bits/dim) and the mean per-step terms ``vb``, ``mse``,
        ``xstart_mse`` (each (T,), noisiest step first).
    """
    device = dist_util.dev()
    generator = make_generator(step_seed(seed, dist_util.get_rank(), 0), device)
    world = dist_util.get_world_size()
    all_bpd: List[float] = []
    all_terms: Dict[str, List[np.ndarray]] = {k: [] for k in TERMS}
    num_complete = 0
    while num_complete < num_samples:
        batch, model_kwargs = next(data)
        batch = batch.to(device)
        model_kwargs = {k: v.to(device) for k, v in model_kwargs.items()}
        metrics = diffusion.calc_bpd_loop(
            model,
            batch,
            clip_denoised=clip_denoised,
            model_kwargs=model_kwargs,
            generator=generator,
        )
        # means over this batch, then over ranks: one all-reduce of (3T + 1,) values
        means = torch.cat(
            [metrics[k].mean(dim=0) for k in TERMS] + [metrics["total_bpd"].mean()[None]]
        )
        if world > 1:
            means = dist_util.all_reduce_mean(means)
        steps = metrics["vb"].shape[1]
        pieces = torch.split(means.cpu(), [steps] * len(TERMS) + [1])
        for key, piece in zip(TERMS, pieces):
            all_terms[key].append(piece.numpy())
        all_bpd.append(float(pieces[-1][0]))
        num_complete += world * batch.shape[0]
        logger.log(f"done {num_complete} samples: bpd={np.mean(all_bpd):.6f}")
    out = {k: np.mean(np.stack(v), axis=0) for k, v in all_terms.items()}
    out["bpd"] = np.float64(np.mean(all_bpd))
    return out
