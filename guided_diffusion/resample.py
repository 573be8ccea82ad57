"""Timestep samplers for training: uniform, or importance sampling by the loss second moment."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, Optional

import numpy as np
import torch

from . import dist_util


def create_named_schedule_sampler(name: str, diffusion, seed: Optional[int] = None):
    """``uniform`` or ``loss-second-moment`` (Nichol & Dhariwal 2021, section 3.3)."""
    if name == "uniform":
        return UniformSampler(diffusion, seed=seed)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion, seed=seed)
    raise NotImplementedError(
        f"unknown schedule sampler {name!r}: use uniform or loss-second-moment"
    )


class ScheduleSampler(ABC):
    """A distribution over timesteps, with importance weights that keep the loss unbiased."""

    def __init__(self, seed: Optional[int] = None):
        self.rng = np.random.default_rng(seed)

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalised positive weights, one per diffusion step."""

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """What a resumed run needs to continue exactly (nothing for a fixed distribution)."""
        return {}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict()``."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")

    def sample(self, batch_size: int, device):
        """Draw timesteps and their importance weights ``1 / (T p(t))``.

        :return: (timesteps (N,) long tensor, weights (N,) float tensor).
        """
        w = self.weights()
        p = w / np.sum(w)
        indices_np = self.rng.choice(len(p), size=(batch_size,), p=p)
        indices = torch.from_numpy(indices_np).long().to(device)
        weights_np = 1 / (len(p) * p[indices_np])
        weights = torch.from_numpy(weights_np).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion, seed: Optional[int] = None):
        super().__init__(seed)
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self) -> np.ndarray:
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler that learns from the losses of every rank."""

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """Gather the (timestep, loss) pairs of all ranks and update (every rank calls this)."""
        pairs = list(zip(local_ts.tolist(), local_losses.detach().float().tolist()))
        gathered = dist_util.all_gather_object(pairs)
        timesteps = [t for rank_pairs in gathered for t, _ in rank_pairs]
        losses = [x for rank_pairs in gathered for _, x in rank_pairs]
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses) -> None: ...


class LossSecondMomentResampler(LossAwareSampler):
    """p(t) proportional to sqrt(E[L_t^2]) once every step has ``history_per_term`` losses."""

    def __init__(
        self,
        diffusion,
        history_per_term: int = 10,
        uniform_prob: float = 0.001,
        seed: Optional[int] = None,
    ):
        super().__init__(seed)
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=int)

    def weights(self) -> np.ndarray:
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses) -> None:
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]  # drop the oldest
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {
            "loss_history": torch.from_numpy(self._loss_history.copy()),
            "loss_counts": torch.from_numpy(self._loss_counts.astype(np.int64)),
        }

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        if state:
            self._loss_history[...] = state["loss_history"].numpy()
            self._loss_counts[...] = state["loss_counts"].numpy()

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())
