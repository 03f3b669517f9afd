"""MSRoPE: Qwen-Image's multimodal scalable rotary position embedding (docs/spec.md §2).

Every token carries a 3-D position (frame, height, width):

* image tokens of the i-th image in a sample (the target is image 0, condition images follow)
  get frame ``i`` and *centred* row/column indices ``r - (h - h//2)`` / ``c - (w - w//2)``;
* text token ``k`` gets ``max_vid_index + k`` on all three axes (the "diagonal"), where
  ``max_vid_index = max(h//2, w//2)`` over all images of the sample.

Each axis has its own frequency spectrum ``theta^(-2j/d_axis)``; the head dimension is split as
``[frame | height | width] = axes_dims_rope`` and adjacent real pairs ``(x[2j], x[2j+1])`` are
rotated as one complex number.

Tables are built per batch as unit complex numbers ``exp(i·angle)`` of shape ``[s, b, 1,
head_dim/2]`` (``b`` is 1 when all samples share one layout) so they broadcast against
Megatron-layout ``[s, b, heads, head_dim]`` queries and keys.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

ImageShape = tuple[int, int, int]


def normalize_img_shapes(img_shapes, batch_size: int) -> list[list[ImageShape]]:
    """Return one list of ``(frames, h, w)`` tuples per sample (target first).

    Accepts the diffusers forms: a list per sample of tuples, or a single list of tuples applied
    to the whole batch. Raises ``ValueError`` naming the offending entry otherwise.
    """
    if img_shapes is None:
        raise ValueError("img_shapes is required: a list per sample of (frames, h, w) patch-grid tuples")
    shapes = list(img_shapes)
    if (
        shapes
        and isinstance(shapes[0], (tuple,))
        and len(shapes[0]) == 3
        and all(isinstance(v, int) for v in shapes[0])
    ):
        # One layout for the whole batch: [(1, h, w), ...].
        shapes = [shapes] * batch_size
    if len(shapes) != batch_size:
        raise ValueError(f"img_shapes has {len(shapes)} entries but the batch has {batch_size} samples")
    out: list[list[ImageShape]] = []
    for b, sample in enumerate(shapes):
        if isinstance(sample, tuple) and len(sample) == 3 and all(isinstance(v, int) for v in sample):
            sample = [sample]
        sample_shapes = []
        for entry in sample:
            if len(entry) != 3 or any(int(v) <= 0 for v in entry):
                raise ValueError(f"img_shapes[{b}] entry {entry!r}: expected (frames, h, w) with positive patch counts")
            sample_shapes.append(tuple(int(v) for v in entry))
        if not sample_shapes:
            raise ValueError(f"img_shapes[{b}] is empty: each sample needs at least its target image")
        out.append(sample_shapes)
    return out


def image_position_ids(shapes: Sequence[ImageShape]) -> torch.Tensor:
    """Positions ``[n_tokens, 3]`` (int64: frame, row, col) of one sample's images, in token order."""
    ids = []
    for index, (frames, h, w) in enumerate(shapes):
        f = torch.arange(index, index + frames, device="cpu")
        r = torch.arange(h, device="cpu") - (h - h // 2)
        c = torch.arange(w, device="cpu") - (w - w // 2)
        grid = torch.stack(torch.meshgrid(f, r, c, indexing="ij"), dim=-1)
        ids.append(grid.reshape(-1, 3))
    return torch.cat(ids, dim=0)


def text_position_ids(shapes: Sequence[ImageShape], num_text_tokens: int) -> torch.Tensor:
    """Positions ``[num_text_tokens, 3]`` of the text tokens: the diagonal after the images."""
    max_vid_index = max(max(h // 2, w // 2) for _, h, w in shapes)
    pos = torch.arange(max_vid_index, max_vid_index + num_text_tokens, device="cpu")
    return pos[:, None].expand(-1, 3)


class MSRoPE:
    """Builds cos/sin tables for text and image tokens of a batch.

    Args:
        axes_dims: head-dim split per axis, e.g. ``(16, 56, 56)``; sums to the head dim.
        theta: RoPE base (10000 for Qwen-Image).
    """

    def __init__(self, axes_dims: Sequence[int], theta: float = 10000.0):
        self.axes_dims = tuple(int(a) for a in axes_dims)
        self.theta = float(theta)
        # Per-axis inverse frequencies theta^(-2j/d), computed exactly as the reference does
        # (fp32 pow of an fp32 ratio) so the angles agree to the last bit.
        self.inv_freqs = [
            1.0 / torch.pow(self.theta, torch.arange(0, d, 2, device="cpu").to(torch.float32).div(d))
            for d in self.axes_dims
        ]

    def angles(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Rotation angles ``[n, head_dim/2]`` (fp32, radians) for positions ``[n, 3]``."""
        parts = [
            position_ids[:, axis].to(torch.float32)[:, None] * inv[None, :] for axis, inv in enumerate(self.inv_freqs)
        ]
        return torch.cat(parts, dim=-1)

    def tables(
        self,
        shapes_per_sample: list[list[ImageShape]],
        num_text_tokens: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(txt_rotations, img_rotations)``, each ``[s, b|1, 1, head_dim/2]`` complex64.

        ``s`` is the text length (padded length, as current diffusers does) for the text tables and
        the total image-token count of a sample (target + conditions) for the image tables.
        Tables are cached per (layout, text length, device): a training run sees a handful of
        buckets, and every step and pipeline stage reuses them instead of rebuilding and copying.
        """
        key = tuple(tuple(tuple(shape) for shape in sample) for sample in shapes_per_sample)
        return self._cached_tables(key, int(num_text_tokens), torch.device(device))

    @functools.lru_cache(maxsize=64)
    def _cached_tables(self, shapes_per_sample, num_text_tokens: int, device: torch.device):
        unique = set(shapes_per_sample)
        samples = [shapes_per_sample[0]] if len(unique) == 1 else list(shapes_per_sample)
        img_angles, txt_angles = [], []
        n_img = None
        for shapes in samples:
            ids = image_position_ids(shapes)
            if n_img is not None and ids.shape[0] != n_img:
                raise ValueError(
                    "img_shapes: every sample of a batch must have the same number of image tokens, "
                    f"got {n_img} and {ids.shape[0]}"
                )
            n_img = ids.shape[0]
            img_angles.append(self.angles(ids))
            txt_angles.append(self.angles(text_position_ids(shapes, num_text_tokens)))
        img = torch.stack(img_angles, dim=1)[:, :, None, :].to(device)  # [n_img, b|1, 1, d/2]
        txt = torch.stack(txt_angles, dim=1)[:, :, None, :].to(device)  # [n_txt, b|1, 1, d/2]
        return _rotations(txt), _rotations(img)


def _rotations(angles: torch.Tensor) -> torch.Tensor:
    """Unit complex numbers ``exp(i·angle)`` (complex64), as the reference's ``torch.polar``."""
    return torch.polar(torch.ones_like(angles), angles)


def pad_rotations(rotations: torch.Tensor, pad: int) -> torch.Tensor:
    """Append `pad` identity rotations (1 + 0i) along dim 0 (for sequence-parallel padding)."""
    if not pad:
        return rotations
    return torch.cat([rotations, rotations.new_ones((pad, *rotations.shape[1:]))], dim=0)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``x`` ``[s, b, heads, head_dim]`` as complex numbers.

    ``rotations`` is ``[s, b|1, 1, head_dim/2]`` complex64; the product runs in fp32 complex and the
    result is cast back to ``x.dtype``, exactly as the reference does.
    """
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rotations).flatten(-2).to(x.dtype)
