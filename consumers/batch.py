"""A micro-batch and what it feeds the model and the loss.

* `Batch`: one micro-batch of one bucket (target latents, condition latents, padded text + mask).
* `StepInputs` / `make_inputs`: pack latents, draw σ and noise per *sample* from a generator
  seeded by ``(seed, step, global sample index)`` (`sample_generator`, `draw_sigma_and_noise`):
  the draws do not depend on the parallel layout, the micro-batch split or the rank that holds
  the sample. The noisy input and the velocity target are
  `megatron_qwenimage.flow_matching.flow_matching_inputs`, computed on the training device.
* `loss_sum_over_global`, `count_image_tokens`.

Loss convention: each micro-batch contributes ``sum(per-sample loss) / global_batch_size`` and
backward runs on that, so after accumulation (and the DP *sum* in the optimizer) the gradient is
the gradient of the mean per-sample loss over the global batch, for any layout.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from math import prod

import torch

from megatron_qwenimage.data.reader_config import TASKS
from megatron_qwenimage.flow_matching import (
    SigmaSampler,
    flow_matching_inputs,
    flow_matching_loss,
    pack_latents,
)


# ---------------------------------------------------------------------------------------- batch
@dataclass
class Batch:
    """One micro-batch; every sample has the same bucket (static shapes).

    Attributes:
        latents: ``[b, C, h, w]`` target latents (normalised VAE latents, any float dtype).
        text: ``[b, T, D_txt]`` text embeddings, zero-padded to the step's text length T.
        text_mask: ``[b, T]`` bool, True for real text tokens.
        sample_index: ``[b]`` int64 index of each sample in the step's *global* batch (seeds σ/noise;
            a CPU tensor, read on the host, wherever the other tensors live).
        condition_latents: per condition image, ``[b, C, hc, wc]`` clean latents (edit: the
            source image; i2i reconstruction: the target itself); empty for t2i.
        task: "t2i", "edit" or "i2i".
    """

    latents: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor
    sample_index: torch.Tensor
    condition_latents: list[torch.Tensor] = field(default_factory=list)
    task: str = "t2i"

    def __post_init__(self) -> None:
        if self.latents.dim() != 4:
            raise ValueError(f"Batch.latents must be [b, C, h, w], got shape {tuple(self.latents.shape)}")
        b = self.latents.shape[0]
        if self.text.dim() != 3 or self.text.shape[0] != b:
            raise ValueError(f"Batch.text must be [{b}, T, D_txt], got shape {tuple(self.text.shape)}")
        if tuple(self.text_mask.shape) != tuple(self.text.shape[:2]) or self.text_mask.dtype != torch.bool:
            raise ValueError(
                f"Batch.text_mask must be bool [{b}, {self.text.shape[1]}], got {self.text_mask.dtype} "
                f"{tuple(self.text_mask.shape)}"
            )
        if tuple(self.sample_index.shape) != (b,):
            raise ValueError(f"Batch.sample_index must be [{b}], got shape {tuple(self.sample_index.shape)}")
        if self.task not in TASKS:
            raise ValueError(f"Batch.task={self.task!r}: expected one of {TASKS}")
        if self.task == "t2i" and self.condition_latents:
            raise ValueError("Batch.task='t2i' must not carry condition_latents")
        if self.task != "t2i" and not self.condition_latents:
            raise ValueError(f"Batch.task={self.task!r} needs condition_latents")
        for i, c in enumerate(self.condition_latents):
            if c.dim() != 4 or c.shape[:2] != self.latents.shape[:2]:
                raise ValueError(
                    f"Batch.condition_latents[{i}] must be [{b}, {self.latents.shape[1]}, hc, wc], "
                    f"got shape {tuple(c.shape)}"
                )

    @property
    def size(self) -> int:
        return int(self.latents.shape[0])

    def patch_grids(self, patch_size: int) -> list[tuple[int, int, int]]:
        """``(frames, h, w)`` patch grids of one sample: target first, then the conditions."""
        grids = []
        for lat in [self.latents, *self.condition_latents]:
            h, w = lat.shape[-2:]
            grids.append((1, h // patch_size, w // patch_size))
        return grids

    def shape_key(self) -> tuple:
        """Everything that fixes the tensor shapes of a step (for caching pipeline schedules)."""
        return (
            self.task,
            tuple(self.latents.shape),
            tuple(self.text.shape),
            tuple(tuple(c.shape) for c in self.condition_latents),
        )


# ---------------------------------------------------------------------------------------- inputs
@dataclass
class StepInputs:
    """Model inputs and loss target of a micro-batch (diffusers layout, batch first).

    Attributes:
        hidden_states: ``[b, N_target + N_cond, 4C]`` noisy target tokens, then clean condition tokens.
        text: ``[b, T, D_txt]``. text_mask: ``[b, T]`` bool. sigma: ``[b]`` fp32 σ.
        target: ``[b, N_target, 4C]`` fp32 velocity target ε − x₀.
        img_shapes: per sample, the patch grids (target first).
    """

    hidden_states: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor
    sigma: torch.Tensor
    target: torch.Tensor
    img_shapes: list

    @property
    def num_target_tokens(self) -> int:
        return int(self.target.shape[1])


def sample_generator(seed: int, step: int, sample_index: int) -> torch.Generator:
    """CPU generator for one sample of one step, independent of the layout."""
    key = zlib.crc32(f"{seed}/{step}/{sample_index}".encode())
    return torch.Generator().manual_seed((seed * 1_000_003 + key) % 2**63)


def draw_sigma_and_noise(
    sample_index: torch.Tensor,
    token_shape: tuple[int, int],
    *,
    step: int,
    seed: int,
    sigma_sampler: SigmaSampler,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """σ ``[b]`` and ε ``[b, N, 4C]`` (fp32, on `device`) of the samples numbered `sample_index`.

    Each sample's σ and then its ε come from its own `sample_generator` (a CPU stream keyed by
    ``(seed, step, global sample index)``), so a sample draws the same values whichever rank,
    layout or micro-batch holds it, and whatever `device` is; the draws move to `device` in one
    copy each, before anything mixes them with the latents.

    Args:
        sample_index: ``[b]`` int64, each sample's index in the step's global batch.
        token_shape: ``(N, 4C)``, one sample's packed target tokens (`pack_latents`).
    """
    sigmas, noises = [], []
    for i in sample_index.tolist():
        gen = sample_generator(seed, step, int(i))
        sigmas.append(sigma_sampler.sample(1, generator=gen, image_tokens=token_shape[0])[0].float())
        noises.append(torch.randn(token_shape, generator=gen, dtype=torch.float32))
    return torch.stack(sigmas).to(device), torch.stack(noises).to(device)


def make_inputs(
    batch: Batch,
    *,
    step: int,
    seed: int,
    sigma_sampler: SigmaSampler,
    patch_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> StepInputs:
    """The model inputs and loss target of `batch`, every tensor on `device` (the training device).

    The batch's latents are packed on `device` (training batches are already there:
    `consumers.data.broadcast_micro_batches` puts them there; validation batches move here), σ
    and ε are `draw_sigma_and_noise` (on `device`), and the noisy input ``(1 − σ)·x₀ + σ·ε`` and
    the target ``ε − x₀`` are `megatron_qwenimage.flow_matching.flow_matching_inputs` in fp32
    there, followed by the clean condition tokens; hidden states and text are then cast to `dtype`.
    """
    x0 = pack_latents(batch.latents.to(device=device, dtype=torch.float32))  # [b, N, 4C]
    sigma, noise = draw_sigma_and_noise(
        batch.sample_index, tuple(x0.shape[1:]), step=step, seed=seed, sigma_sampler=sigma_sampler, device=device
    )
    fm = flow_matching_inputs(x0, noise, sigma)
    cond = [pack_latents(c.to(device=device, dtype=torch.float32)) for c in batch.condition_latents]
    hidden = torch.cat([fm.noisy, *cond], dim=1)
    grids = batch.patch_grids(patch_size)
    return StepInputs(
        hidden_states=hidden.to(dtype=dtype),
        text=batch.text.to(device=device, dtype=dtype),
        text_mask=batch.text_mask.to(device),
        sigma=fm.sigma,
        target=fm.target,
        img_shapes=[list(grids)] * batch.size,
    )


def loss_sum_over_global(prediction: torch.Tensor, target: torch.Tensor, global_batch_size: int) -> torch.Tensor:
    """``sum(per-sample masked MSE) / global_batch_size`` (fp32 scalar); prediction ``[b, n, c]``."""
    return flow_matching_loss(prediction, target).per_sample.sum() / global_batch_size


def count_image_tokens(inputs: Sequence[StepInputs]) -> int:
    """Target image tokens in `inputs` (what "image tokens/s" counts)."""
    return sum(int(prod(mb.target.shape[:2])) for mb in inputs)
