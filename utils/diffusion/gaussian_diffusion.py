"""One Gaussian diffusion implementation for both model families.

It follows improved-diffusion's ``GaussianDiffusion``/``SpacedDiffusion`` arithmetic
(Nichol & Dhariwal 2021): schedules are computed in float64 and each coefficient is cast
to float32 when it is gathered, exactly as the references do, so that results match
them to float32 rounding. Ho et al.'s DDPM (pytorch_diffusion, used by DataElixir) is the
special case ``linear`` betas + ``fixed_large`` variance + epsilon prediction + no
timestep rescaling: its ``denoising_step`` is :meth:`GaussianDiffusion.p_sample` here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch

MODEL_VAR_TYPES = ("learned", "learned_range", "fixed_large", "fixed_small")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")


# --------------------------------------------------------------------------- schedules


def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    betas = []
    for i in range(num_steps):
        t1, t2 = i / num_steps, (i + 1) / num_steps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def get_named_beta_schedule(
    name: str, num_steps: int, beta_start: float | None = None, beta_end: float | None = None
) -> np.ndarray:
    """``linear`` (Ho et al.; scaled to ``num_steps`` as in improved-diffusion unless
    ``beta_start``/``beta_end`` are given) or ``cosine`` (Nichol & Dhariwal)."""
    if name == "linear":
        if beta_start is None or beta_end is None:
            scale = 1000 / num_steps
            beta_start, beta_end = scale * 0.0001, scale * 0.02
        return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(num_steps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown beta schedule {name!r}; expected 'linear' or 'cosine'")


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> set[int]:
    """improved-diffusion's respacing: ``"ddimN"`` (a stride giving N steps) or a comma
    list of per-section step counts (``"10,15,20"``), each section evenly strided."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


# --------------------------------------------------------------------------- helpers


def _extract(arr: np.ndarray, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Gather float64 ``arr[t]`` and cast to float32, broadcastable to ``shape``."""
    out = torch.from_numpy(arr).to(t.device)[t.long()].float()
    return out.reshape(out.shape + (1,) * (len(shape) - 1))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-likelihood of a Gaussian discretised to 256 bins over [-1, 1]."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


# --------------------------------------------------------------------------- diffusion


class GaussianDiffusion:
    """Diffusion arithmetic over ``betas``; the model is passed to each call.

    ``use_timesteps`` respaces the process (improved-diffusion's ``SpacedDiffusion``):
    the kept steps get betas that preserve ``alphas_cumprod`` at those steps, and the
    model is called with the original step index (``timestep_map``), rescaled to
    0..1000 when ``rescale_timesteps`` is set.
    """

    def __init__(
        self,
        betas: np.ndarray,
        *,
        model_var_type: str = "fixed_large",
        loss_type: str = "mse",
        rescale_timesteps: bool = False,
        use_timesteps: Iterable[int] | None = None,
    ):
        if model_var_type not in MODEL_VAR_TYPES:
            raise ValueError(f"model_var_type must be one of {MODEL_VAR_TYPES}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}")
        betas = np.asarray(betas, dtype=np.float64)
        self.original_num_steps = len(betas)
        if use_timesteps is not None:
            keep = sorted(set(int(t) for t in use_timesteps))
            if not keep or keep[0] < 0 or keep[-1] >= len(betas):
                raise ValueError("use_timesteps must lie in [0, num_timesteps)")
            alphas_cumprod = np.cumprod(1.0 - betas)
            last, new_betas = 1.0, []
            for i in keep:
                new_betas.append(1 - alphas_cumprod[i] / last)
                last = alphas_cumprod[i]
            betas = np.array(new_betas, dtype=np.float64)
            self.timestep_map = np.array(keep, dtype=np.int64)
        else:
            self.timestep_map = np.arange(len(betas), dtype=np.int64)
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps
        self._set_betas(betas)

    def _set_betas(self, betas: np.ndarray) -> None:
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
        self.betas = betas
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log of the posterior variance, clipped because it is 0 at the start of the chain
        pv1 = self.posterior_variance[1] if len(betas) > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(pv1, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # fixed variances: "large" = betas (with the first posterior variance), "small" = posterior
        self.fixed_large_variance = np.append(pv1, betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

    @property
    def learns_sigma(self) -> bool:
        return self.model_var_type in ("learned", "learned_range")

    # ----------------------------------------------------------------- forward process

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample ``x_t ~ q(x_t | x_0)`` in one shot."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = (
            _extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = _extract(self.posterior_variance, t, x_t.shape)
        log_variance = _extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # ----------------------------------------------------------------- reverse process

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is called with for (possibly respaced) step indices ``t``."""
        mapped = torch.from_numpy(self.timestep_map).to(t.device)[t.long()]
        if self.rescale_timesteps:
            return mapped.float() * (1000.0 / self.original_num_steps)
        return mapped

    def p_mean_variance(self, model, x, t, *, clip_denoised: bool = True, model_output: torch.Tensor | None = None):
        """Mean, variance and predicted ``x_0`` of ``p(x_{t-1} | x_t)`` (epsilon prediction).

        ``model_output`` may be given instead of calling ``model`` (tests, cached runs).
        """
        B, C = x.shape[:2]
        if model_output is None:
            model_output = model(x, self.model_timesteps(t))
        model_output = model_output.float()
        if self.learns_sigma:
            assert model_output.shape[1] == 2 * C, "a learned-sigma model must output 2*C channels"
            model_output, var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == "learned":
                log_variance = var_values
            else:
                min_log = _extract(self.posterior_log_variance_clipped, t, x.shape)
                max_log = _extract(np.log(self.betas), t, x.shape)
                frac = (var_values + 1) / 2  # the network predicts in [-1, 1]
                log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        elif self.model_var_type == "fixed_large":
            variance = _extract(self.fixed_large_variance, t, x.shape)
            log_variance = _extract(self.fixed_large_log_variance, t, x.shape)
        else:
            variance = _extract(self.posterior_variance, t, x.shape)
            log_variance = _extract(self.posterior_log_variance_clipped, t, x.shape)
        pred_xstart = (
            _extract(self.sqrt_recip_alphas_cumprod, t, x.shape) * x
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x.shape) * model_output
        )
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        variance = variance.expand_as(x) if variance.shape != x.shape else variance
        log_variance = log_variance.expand_as(x) if log_variance.shape != x.shape else log_variance
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_sample(
        self,
        model,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        clip_denoised: bool = True,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        model_output: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One ancestral step ``x_t -> x_{t-1}``; no noise is added at ``t == 0``."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_output=model_output)
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        nonzero = (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # ----------------------------------------------------------------- training

    def _vb_terms_bpd(self, model_output, x_start, x_t, t, clip_denoised: bool = False):
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(None, x_t, t, clip_denoised=clip_denoised, model_output=model_output)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        model_output: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-example losses: ``mse`` on epsilon, plus for learned sigmas the variational
        bound ``vb`` with the mean detached (the hybrid loss ``mse + vb``)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        if model_output is None:
            model_output = model(x_t, self.model_timesteps(t))
        model_output = model_output.float()
        terms: dict[str, torch.Tensor] = {}
        if self.loss_type in ("kl", "rescaled_kl"):
            terms["loss"] = self._vb_terms_bpd(model_output, x_start, x_t, t)
            if self.loss_type == "rescaled_kl":
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms
        C = x_t.shape[1]
        if self.learns_sigma:
            eps, var_values = torch.split(model_output, C, dim=1)
            frozen = torch.cat([eps.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(frozen, x_start, x_t, t)
            if self.loss_type == "rescaled_mse":
                # the vb term is scaled so that it has the same magnitude as for 1000 steps
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        else:
            eps = model_output
        terms["mse"] = mean_flat((noise - eps) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # ----------------------------------------------------------------- derived processes

    def respaced(self, use_timesteps: Iterable[int]) -> GaussianDiffusion:
        """The same process on a subset of this process's (original) steps."""
        if self.num_timesteps != self.original_num_steps:
            raise ValueError("respace the original process, not an already respaced one")
        return GaussianDiffusion(
            self.betas,
            model_var_type=self.model_var_type,
            loss_type=self.loss_type,
            rescale_timesteps=self.rescale_timesteps,
            use_timesteps=use_timesteps,
        )


def truncated_steps(t_star: int, respace: int | None = None, dense_tail: int = 0) -> list[int]:
    """The original steps ``0 .. t_star-1`` a purification visits, or ``respace`` of them
    evenly spaced (always keeping ``0`` and ``t_star - 1``, so the noise level is unchanged).

    ``dense_tail=m`` keeps the last ``m`` steps ``m-1 .. 0`` unspaced and spreads the other
    ``respace - m`` over ``m .. t_star-1``: the final reverse samples are then at the noise
    levels of the full chain (DataElixir keeps its last samples as candidates)."""
    if t_star < 1:
        raise ValueError("t* must be >= 1")
    if respace is None or respace >= t_star:
        return list(range(t_star))
    if respace < 1:
        raise ValueError("respace must be >= 1")
    if not 0 <= dense_tail < respace:
        raise ValueError(f"dense_tail must be in 0..respace-1 ({respace - 1}), got {dense_tail}")
    lo, hi, k = dense_tail, t_star - 1, respace - dense_tail
    if k == 1:
        return [*range(dense_tail), hi]
    return [*range(dense_tail), *sorted({lo + round(i * (hi - lo) / (k - 1)) for i in range(k)})]
