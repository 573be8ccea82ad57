"""Training losses and the variational bound of a Gaussian diffusion.

``VariationalBound`` is the part of ``GaussianDiffusion`` that trains and scores: the
simple eps/x_0 MSE of Ho et al. 2020 (eq. 14), the hybrid objective of Nichol & Dhariwal
2021 (the VB term trains the learned variance only), input perturbation (DDPM-IP, Ning et
al. 2023) and the bound in bits per dimension (Ho et al. eq. 5, with the discretised
decoder of eq. 13).

Epsilon Scaling: training losses never use lambda. ``calc_bpd_loop`` scores the sampler
that the process describes, so it applies lambda as the original ADM-ES code does (through
``p_mean_variance``); build the process with b = 1, k = 0 for the plain ADM bound.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from .diffusion_schedule import LossType, ModelMeanType, ModelVarType, _randn_like
from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import mean_flat


class VariationalBound:
    """Losses and bounds; mixed into ``GaussianDiffusion`` (uses its schedule and
    ``p_mean_variance``)."""

    def _vb_terms_bpd(
        self,
        model,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: Optional[dict] = None,
        use_eps_scaler: bool = True,
    ) -> Dict[str, torch.Tensor]:
        """One term of the variational bound in bits per dimension.

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the discretised decoder
        NLL -log p(x_0 | x_1) at t = 0.

        :param use_eps_scaler: evaluate p with the process's Epsilon Scaling (the original's
            behaviour); the training losses pass False.
        """
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(
            x_start=x_start, x_t=x_t, t=t
        )
        out = self.p_mean_variance(
            model,
            x_t,
            t,
            clip_denoised=clip_denoised,
            model_kwargs=model_kwargs,
            use_eps_scaler=use_eps_scaler,
        )
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        assert decoder_nll.shape == x_start.shape
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        output = torch.where(t == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Optional[dict] = None,
        noise: Optional[torch.Tensor] = None,
        input_perturbation: float = 0.0,
        xi: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Per-sample training losses for one batch (never with Epsilon Scaling).

        :param input_perturbation: gamma of DDPM-IP (Ning et al. 2023): the network sees
            x_t = q_sample(x_0, t, noise + gamma * xi) while the target stays ``noise``.
        :param xi: the perturbation noise (drawn when None and gamma > 0).
        :return: dict with ``loss`` and its parts (``mse``, ``vb``), each of shape (N,).
        """
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        if input_perturbation:
            if xi is None:
                xi = torch.randn_like(x_start)
            x_t = self.q_sample(x_start, t, noise=noise + input_perturbation * xi)
        else:
            x_t = self.q_sample(x_start, t, noise=noise)

        if self.loss_type.is_vb():
            loss = self._vb_terms_bpd(
                model,
                x_start,
                x_t,
                t,
                clip_denoised=False,
                model_kwargs=model_kwargs,
                use_eps_scaler=False,
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                loss = loss * self.num_timesteps
            return {"loss": loss}
        model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)
        return self._hybrid_terms(model_output, x_start, x_t, t, noise)

    def _hybrid_terms(self, model_output, x_start, x_t, t, noise) -> Dict[str, torch.Tensor]:
        """The MSE of the mean prediction plus, for a learned variance, the VB term with the
        mean detached (Nichol & Dhariwal 2021, L_hybrid = L_simple + lambda L_vlb)."""
        terms: Dict[str, torch.Tensor] = {}
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            B, C = x_t.shape[:2]
            assert model_output.shape == (B, C * 2, *x_t.shape[2:])
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            # the VB term trains the variance only: the mean half is detached
            frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(
                lambda *args, r=frozen_out, **kwargs: r,
                x_start,
                x_t,
                t,
                clip_denoised=False,
                use_eps_scaler=False,
            )["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # the MSE term is a mean, the VB term a sum over timesteps (Nichol & Dhariwal)
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = {
            ModelMeanType.PREVIOUS_X: lambda: self.q_posterior_mean_variance(x_start, x_t, t)[0],
            ModelMeanType.START_X: lambda: x_start,
            ModelMeanType.EPSILON: lambda: noise,
        }[self.model_mean_type]()
        assert model_output.shape == target.shape == x_start.shape
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(qt_mean, qt_log_variance, 0.0, 0.0)
        return mean_flat(kl_prior) / np.log(2.0)

    def calc_bpd_loop(
        self,
        model,
        x_start: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: Optional[dict] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Dict[str, torch.Tensor]:
        """The full variational bound in bits per dimension, with its per-step terms.

        The bound is that of this process's sampler: with Epsilon Scaling (lambda != 1)
        p(x_{t-1} | x_t) is the scaled one, as in the original ADM-ES code; b = 1, k = 0
        gives the plain ADM bound. (Training losses never use lambda.)

        :return: ``total_bpd`` (N,), ``prior_bpd`` (N,), ``vb`` (N, T), ``xstart_mse`` (N, T),
            ``mse`` (N, T); the per-step columns run from the noisiest step (T-1) to 0.
        """
        batch = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((batch,), i, device=x_start.device, dtype=torch.long)
            noise = _randn_like(x_start, generator)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(
                    model, x_start, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb_t = torch.stack(vb, dim=1)  # (N, T); column 0 is the noisiest step, as the original
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb_t.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb_t,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
        }
