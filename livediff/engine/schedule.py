"""The noise schedule as device tables, read once from the model's scheduler config.

Every coefficient a few-step img2img loop needs, for all training timesteps, is computed once;
a stream's timesteps then select rows of these tables on the device, with no per-frame host work.
Per-stream progress lives in the stream's own tensors, never on a scheduler object, so streams at
different steps can share one batch.
"""

from __future__ import annotations

import torch
from diffusers import LCMScheduler, SchedulerMixin

SIGMA_DATA = 0.5
"""Consistency-model boundary condition constants (LCM)."""
TIMESTEP_SCALING = 10.0

# Rows of `NoiseSchedule.table` and of a stream's coefficient tensor.
T, SQRT_ALPHA, SQRT_BETA, C_SKIP, C_OUT = range(5)


class NoiseSchedule:
    """Coefficients indexed by training timestep: (5, num_train_timesteps) on the device."""

    def __init__(self, scheduler: SchedulerMixin, device: torch.device) -> None:
        config = scheduler.config
        self.prediction_type: str = config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
        steps = torch.arange(len(alphas_cumprod), dtype=torch.float64)
        if isinstance(scheduler, LCMScheduler):
            scaled = steps * TIMESTEP_SCALING
            c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
            c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        else:  # Euler/DDIM-style samplers (SD-Turbo) take the predicted x0 as is
            c_skip = torch.zeros_like(steps)
            c_out = torch.ones_like(steps)
        table = torch.stack([steps, alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt(), c_skip, c_out])
        self.table = table.to(device=device, dtype=torch.float32)
        self.num_train_timesteps = len(alphas_cumprod)

    def coefficients(self, timesteps: tuple[int, ...]) -> torch.Tensor:
        """(5, len(timesteps)) device tensor for one stream's timesteps (one copy, at params change)."""
        index = torch.tensor(timesteps, dtype=torch.long).to(self.table.device)
        return self.table[:, index]

    def predict_x0(self, sample: torch.Tensor, model_output: torch.Tensor, coefs: torch.Tensor) -> torch.Tensor:
        """Denoised estimate from the UNet output; `coefs` is (N, 5) broadcast over the sample."""
        c = coefs.to(sample.dtype)[:, :, None, None, None]
        sqrt_alpha, sqrt_beta = c[:, SQRT_ALPHA], c[:, SQRT_BETA]
        if self.prediction_type == "epsilon":
            x0 = (sample - sqrt_beta * model_output) / sqrt_alpha
        else:
            x0 = sqrt_alpha * sample - sqrt_beta * model_output
        return c[:, C_OUT] * x0 + c[:, C_SKIP] * sample

    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, coefs: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise, per sample."""
        c = coefs.to(x0.dtype)[:, :, None, None, None]
        return c[:, SQRT_ALPHA] * x0 + c[:, SQRT_BETA] * noise
