"""Rectified-flow (flow-matching) objective of Qwen-Image, in the diffusers convention.

docs/spec.md §6.1: with σ ∈ [0, 1] where **σ = 1 is pure noise**,

    x_σ = (1 − σ)·x₀ + σ·ε,        ε ~ N(0, I)
    v   = ε − x₀                   (the network's regression target)
    L   = MSE(v_θ(x_σ, σ), v)

The model sees ``timestep = σ`` (the pipeline passes ``t / 1000``). This module holds

* latent packing (`pack_latents` / `unpack_latents`): VAE latents ``[B, C, H', W']`` ↔ packed
  tokens ``[B, H'/2·W'/2, 4C]``, bit-exact with diffusers' ``QwenImagePipeline._pack_latents``;
* σ samplers for training (`UniformSigmaSampler`, `LogitNormalSigmaSampler`, and
  `ShiftedSigmaSampler`, the resolution-dependent exponential shift of spec 6.3 applied on top
  of either), all deterministic given a ``torch.Generator``;
* `flow_matching_inputs`, building (noisy input, target, σ) from clean latents and noise;
* `flow_matching_loss`, the masked MSE in packed-token layout;
* `inference_sigmas`, the Euler sampling schedule of the released scheduler config.

Everything here is plain tensor math with no global state.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

# --------------------------------------------------------------------------------------
# Latent packing (spec 4.4)
# --------------------------------------------------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Pack VAE latents into 2×2-patch tokens, exactly as diffusers' ``_pack_latents``.

    Args:
        latents: ``[B, C, H', W']`` latents (H', W' = pixels / 8, both even).

    Returns:
        ``[B, (H'/2)·(W'/2), 4·C]`` tokens, row-major over the ``(H'/2, W'/2)`` patch grid; within a
        token the channel index is ``c·4 + dy·2 + dx``.
    """
    if latents.dim() != 4:
        raise ValueError(f"pack_latents: latents must be [B, C, H', W'], got shape {tuple(latents.shape)}")
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"pack_latents: latent height={h} and width={w} must both be even (2x2 patches)")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2)
    x = x.permute(0, 2, 4, 1, 3, 5)  # [B, H'/2, W'/2, C, dy, dx]
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """Inverse of `pack_latents`.

    Args:
        tokens: ``[B, N, 4·C]`` packed tokens with ``N = (latent_height/2)·(latent_width/2)``.
        latent_height, latent_width: H', W' of the latent grid (pixels / 8; both even).

    Returns:
        ``[B, C, H', W']`` latents (diffusers' ``_unpack_latents`` returns the same values with an
        extra frame axis of size 1: ``[B, C, 1, H', W']``).
    """
    if tokens.dim() != 3:
        raise ValueError(f"unpack_latents: tokens must be [B, N, 4C], got shape {tuple(tokens.shape)}")
    for name, value in (("latent_height", latent_height), ("latent_width", latent_width)):
        if not isinstance(value, int) or value <= 0 or value % 2:
            raise ValueError(f"unpack_latents: {name}={value!r} must be a positive even integer")
    b, n, c4 = tokens.shape
    if c4 % 4:
        raise ValueError(f"unpack_latents: token width {c4} must be a multiple of 4 (C·2·2)")
    h, w = latent_height // 2, latent_width // 2
    if n != h * w:
        raise ValueError(
            f"unpack_latents: tokens hold N={n} tokens but latent_height={latent_height}, "
            f"latent_width={latent_width} need {h}·{w}={h * w}"
        )
    x = tokens.reshape(b, h, w, c4 // 4, 2, 2)
    x = x.permute(0, 3, 1, 4, 2, 5)  # [B, C, H'/2, dy, W'/2, dx]
    return x.reshape(b, c4 // 4, latent_height, latent_width)


# --------------------------------------------------------------------------------------
# Resolution-dependent shift (spec 6.3)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolutionShift:
    """μ as a linear function of the image token count, and the exponential time shift.

    ``mu(L) = m·L + b`` with ``m = (max_shift − base_shift) / (max_seq_len − base_seq_len)`` and
    ``b = base_shift − m·base_seq_len``; defaults are the released scheduler config (spec 6.3).
    L is the number of packed image tokens, ``(H/16)·(W/16)`` for an H×W pixel image.
    """

    base_shift: float = 0.5
    max_shift: float = 0.9
    base_seq_len: int = 256
    max_seq_len: int = 8192

    def __post_init__(self) -> None:
        for name in ("base_seq_len", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ResolutionShift.{name}={value!r}: expected a positive integer")
        if self.max_seq_len <= self.base_seq_len:
            raise ValueError(
                f"ResolutionShift.max_seq_len={self.max_seq_len} must be greater than base_seq_len={self.base_seq_len}"
            )
        for name in ("base_shift", "max_shift"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"ResolutionShift.{name}={value!r}: expected a finite number")

    @property
    def slope(self) -> float:
        return (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)

    @property
    def intercept(self) -> float:
        return self.base_shift - self.slope * self.base_seq_len

    def mu(self, image_tokens: int | float | torch.Tensor) -> float | torch.Tensor:
        """μ for `image_tokens` packed image tokens (a number, or a float tensor of counts)."""
        if isinstance(image_tokens, torch.Tensor):
            if (image_tokens <= 0).any():
                raise ValueError("ResolutionShift.mu: image_tokens must all be positive")
            return image_tokens.to(torch.float64) * self.slope + self.intercept
        if isinstance(image_tokens, bool) or not isinstance(image_tokens, (int, float)) or image_tokens <= 0:
            raise ValueError(f"ResolutionShift.mu: image_tokens={image_tokens!r} must be a positive number")
        return image_tokens * self.slope + self.intercept


def exponential_time_shift(mu: float | torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """σ' = e^μ / (e^μ + (1/σ − 1)); maps σ ∈ (0, 1] into (0, 1], σ=1 ↦ 1.

    σ = 0 maps to 0 (the limit), so a σ sampled exactly at 0 stays clean.
    """
    e_mu = torch.exp(torch.as_tensor(mu, dtype=torch.float64, device=sigma.device))
    s = sigma.to(torch.float64)
    out = torch.where(s > 0, e_mu * s / (e_mu * s + (1.0 - s)), torch.zeros_like(s))
    return out.to(sigma.dtype)


# --------------------------------------------------------------------------------------
# Training σ samplers (spec 6.2)
# --------------------------------------------------------------------------------------


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"sigma sampler: batch_size={batch_size!r} must be a positive integer")


class SigmaSampler(ABC):
    """Draws one σ ∈ [0, 1] per sample. Deterministic given the ``torch.Generator``."""

    @abstractmethod
    def sample(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        image_tokens: int | torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Return ``[batch_size]`` float32 σ's. `image_tokens` is used only by shifted samplers."""


@dataclass(frozen=True)
class UniformSigmaSampler(SigmaSampler):
    """σ ~ U(low, high); the diffusers trainer's default ``weighting_scheme="none"`` is U(0, 1)."""

    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.low < self.high <= 1.0):
            raise ValueError(
                f"UniformSigmaSampler: need 0 <= low < high <= 1, got low={self.low!r}, high={self.high!r}"
            )

    def sample(self, batch_size, *, generator=None, image_tokens=None, device=None):
        _check_batch_size(batch_size)
        u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float32)
        return self.low + (self.high - self.low) * u


@dataclass(frozen=True)
class LogitNormalSigmaSampler(SigmaSampler):
    """σ = sigmoid(m + s·z), z ~ N(0, 1) (SD3's logit-normal; the paper's choice, spec 6.2)."""

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.mean, (int, float)) or not math.isfinite(self.mean):
            raise ValueError(f"LogitNormalSigmaSampler: mean={self.mean!r} must be a finite number")
        if not isinstance(self.std, (int, float)) or not (self.std > 0 and math.isfinite(self.std)):
            raise ValueError(f"LogitNormalSigmaSampler: std={self.std!r} must be a positive finite number")

    def sample(self, batch_size, *, generator=None, image_tokens=None, device=None):
        _check_batch_size(batch_size)
        z = torch.randn(batch_size, generator=generator, device=device, dtype=torch.float32)
        return torch.sigmoid(self.mean + self.std * z)


@dataclass(frozen=True)
class ShiftedSigmaSampler(SigmaSampler):
    """A base sampler's σ pushed through the resolution-dependent exponential shift.

    ``σ' = e^μ / (e^μ + (1/σ − 1))`` with ``μ = shift.mu(image_tokens)``; larger images get more
    noise-heavy σ's. `image_tokens` is required: an int for the whole batch or a ``[B]`` tensor.
    """

    base: SigmaSampler
    shift: ResolutionShift = field(default_factory=ResolutionShift)

    def __post_init__(self) -> None:
        if not isinstance(self.base, SigmaSampler) or isinstance(self.base, ShiftedSigmaSampler):
            raise ValueError(f"ShiftedSigmaSampler: base={self.base!r} must be an unshifted SigmaSampler")
        if not isinstance(self.shift, ResolutionShift):
            raise ValueError(f"ShiftedSigmaSampler: shift={self.shift!r} must be a ResolutionShift")

    def sample(self, batch_size, *, generator=None, image_tokens=None, device=None):
        if image_tokens is None:
            raise ValueError("ShiftedSigmaSampler.sample: image_tokens is required (packed image token count)")
        sigma = self.base.sample(batch_size, generator=generator, device=device)
        if isinstance(image_tokens, torch.Tensor) and image_tokens.shape != (batch_size,):
            raise ValueError(
                f"ShiftedSigmaSampler.sample: image_tokens tensor has shape {tuple(image_tokens.shape)}, "
                f"expected ({batch_size},)"
            )
        mu = self.shift.mu(image_tokens)
        if isinstance(mu, torch.Tensor):
            mu = mu.to(sigma.device)
        return exponential_time_shift(mu, sigma)


SAMPLER_KINDS = ("uniform", "logit_normal")


def build_sigma_sampler(config: Mapping[str, Any]) -> SigmaSampler:
    """Build a sampler from a config mapping (e.g. the ``flow_matching:`` section of a run YAML).

    Keys: ``kind`` (``"uniform"`` | ``"logit_normal"``), that kind's fields (``low``/``high`` or
    ``mean``/``std``), and optionally ``resolution_shift``: ``true`` for the spec 6.3 defaults or a
    mapping of `ResolutionShift` fields.
    """
    cfg = dict(config)
    kind = cfg.pop("kind", None)
    shift_cfg = cfg.pop("resolution_shift", None)
    if kind == "uniform":
        allowed = {"low", "high"}
        cls = UniformSigmaSampler
    elif kind == "logit_normal":
        allowed = {"mean", "std"}
        cls = LogitNormalSigmaSampler
    else:
        raise ValueError(f"sigma sampler config: kind={kind!r}, expected one of {SAMPLER_KINDS}")
    unknown = set(cfg) - allowed
    if unknown:
        raise ValueError(
            f"sigma sampler config: unknown key(s) {sorted(unknown)} for kind={kind!r}; allowed {sorted(allowed)}"
        )
    base = cls(**cfg)
    if shift_cfg is None or shift_cfg is False:
        return base
    if shift_cfg is True:
        return ShiftedSigmaSampler(base)
    if isinstance(shift_cfg, Mapping):
        return ShiftedSigmaSampler(base, ResolutionShift(**shift_cfg))
    raise ValueError(
        f"sigma sampler config: resolution_shift={shift_cfg!r}, expected a bool or a mapping of ResolutionShift fields"
    )


# --------------------------------------------------------------------------------------
# Training inputs and loss
# --------------------------------------------------------------------------------------


class FlowMatchingInputs(NamedTuple):
    """What one training step feeds the model and the loss (packed layout)."""

    noisy: torch.Tensor  #: ``[B, N, C]`` x_σ = (1 − σ)·x₀ + σ·ε, the model's hidden_states
    target: torch.Tensor  #: ``[B, N, C]`` v = ε − x₀
    sigma: torch.Tensor  #: ``[B]`` σ, the model's ``timestep``


def flow_matching_inputs(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> FlowMatchingInputs:
    """Build (noisy input, target, σ) from clean packed latents.

    Args:
        x0: ``[B, N, C]`` clean packed latents (normalised by the VAE's per-channel mean/std).
        noise: ``[B, N, C]`` ε ~ N(0, I), same shape and dtype as `x0`.
        sigma: ``[B]`` noise levels in [0, 1] (σ = 1 is pure noise).
    """
    if x0.dim() != 3:
        raise ValueError(f"flow_matching_inputs: x0 must be [B, N, C], got shape {tuple(x0.shape)}")
    if noise.shape != x0.shape:
        raise ValueError(
            f"flow_matching_inputs: noise shape {tuple(noise.shape)} must equal x0 shape {tuple(x0.shape)}"
        )
    if noise.dtype != x0.dtype:
        raise ValueError(f"flow_matching_inputs: noise dtype {noise.dtype} must equal x0 dtype {x0.dtype}")
    if sigma.shape != (x0.shape[0],):
        raise ValueError(f"flow_matching_inputs: sigma must be [B]=({x0.shape[0]},), got shape {tuple(sigma.shape)}")
    s = sigma.to(x0.dtype).view(-1, 1, 1)
    noisy = (1.0 - s) * x0 + s * noise
    return FlowMatchingInputs(noisy=noisy, target=noise - x0, sigma=sigma)


class FlowMatchingLoss(NamedTuple):
    """Masked MSE, all fp32."""

    loss: torch.Tensor  #: scalar: mean of squared error over all valid tokens and channels in the batch
    per_sample: torch.Tensor  #: ``[B]``: mean over each sample's valid tokens and channels
    sum_squared_error: torch.Tensor  #: scalar: sum over valid elements (for cross-rank averaging)
    num_valid_elements: torch.Tensor  #: scalar: valid tokens × channels (for cross-rank averaging)


def flow_matching_loss(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> FlowMatchingLoss:
    """MSE between predicted and target velocity in packed-token layout.

    Args:
        prediction: ``[B, N, C]`` model output v_θ.
        target: ``[B, N, C]`` ε − x₀.
        mask: optional ``[B, N]`` bool, True for real image tokens, False for padding added to
            batch images of different sizes. Padded tokens contribute nothing, whatever they hold.

    Returns:
        `FlowMatchingLoss`. ``loss`` weights every valid token equally across the batch (equal to
        the mean of ``per_sample`` when all samples have the same number of valid tokens). A sample
        with no valid token has ``per_sample`` 0 rather than NaN.
    """
    if prediction.dim() != 3:
        raise ValueError(f"flow_matching_loss: prediction must be [B, N, C], got shape {tuple(prediction.shape)}")
    if target.shape != prediction.shape:
        raise ValueError(
            f"flow_matching_loss: target shape {tuple(target.shape)} must equal prediction shape "
            f"{tuple(prediction.shape)}"
        )
    b, n, c = prediction.shape
    diff = prediction.float() - target.float()
    if mask is None:
        counts = torch.full((b,), float(n * c), device=diff.device)
    else:
        if mask.shape != (b, n):
            raise ValueError(f"flow_matching_loss: mask must be [B, N]=({b}, {n}), got shape {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"flow_matching_loss: mask must be a bool tensor, got dtype {mask.dtype}")
        # where() before squaring rather than a multiply: NaN/inf in padded predictions must
        # reach neither the loss nor the gradient.
        diff = torch.where(mask[:, :, None], diff, torch.zeros((), device=diff.device))
        counts = mask.sum(dim=1).float() * c
    sums = diff.square().sum(dim=(1, 2))  # [B]
    per_sample = sums / counts.clamp(min=1.0)
    total_sum = sums.sum()
    total_count = counts.sum()
    return FlowMatchingLoss(
        loss=total_sum / total_count.clamp(min=1.0),
        per_sample=per_sample,
        sum_squared_error=total_sum,
        num_valid_elements=total_count,
    )


# --------------------------------------------------------------------------------------
# Inference schedule (spec 6.3)
# --------------------------------------------------------------------------------------


def inference_sigmas(
    num_steps: int,
    image_tokens: int,
    *,
    shift: ResolutionShift = ResolutionShift(),
    shift_terminal: float | None = 0.02,
) -> torch.Tensor:
    """The Euler sampling σ's of the released scheduler config; ``[num_steps + 1]`` float32.

    1. σ = linspace(1, 1/num_steps, num_steps) (what ``QwenImagePipeline`` passes as ``sigmas``);
    2. exponential shift with μ = ``shift.mu(image_tokens)``;
    3. if `shift_terminal`: stretch so the last σ equals it, ``1 − (1 − σ)·(1 − τ)/(1 − σ_last)``;
    4. append 0.
    Computed in float64 and returned as float32, like diffusers' ``scheduler.sigmas``.
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps <= 0:
        raise ValueError(f"inference_sigmas: num_steps={num_steps!r} must be a positive integer")
    if shift_terminal is not None and not (0.0 < shift_terminal < 1.0):
        raise ValueError(f"inference_sigmas: shift_terminal={shift_terminal!r} must be in (0, 1) or None")
    if shift_terminal is not None and num_steps < 2:
        raise ValueError(
            f"inference_sigmas: num_steps={num_steps} cannot be stretched to shift_terminal "
            f"(the only σ is 1); use num_steps >= 2 or shift_terminal=None"
        )
    sigma = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    sigma = exponential_time_shift(shift.mu(image_tokens), sigma)
    if shift_terminal:
        one_minus = 1.0 - sigma
        scale = one_minus[-1] / (1.0 - shift_terminal)
        sigma = 1.0 - one_minus / scale
    return torch.cat([sigma, sigma.new_zeros(1)]).to(torch.float32)
