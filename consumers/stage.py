"""`MMDiTStage`: a pipeline stage (or the whole model) as one ``nn.Module``.

Its forward maps stage inputs to stage outputs, so the same module runs under the local
micro-batch loop (PP = 1, `consumers.pipeline.run_local_microbatches`) and under
``torch.distributed.pipelining`` (PP > 1, `consumers.pipeline.PipelineRunner`).
"""

from __future__ import annotations

import torch

from consumers.precision import Precision
from megatron_qwenimage.model.mmdit import QwenImageMMDiT


class MMDiTStage(torch.nn.Module):
    """One pipeline stage (or the whole model) with stage-to-stage tensors as plain args.

    First stage inputs: ``hidden_states [b, N, 4C]``, ``text [b, T, D_txt]``, ``sigma [b]``;
    other stages: ``img [n, b, D]``, ``txt [t, b, D]``, ``temb [b, D]`` from the previous stage.
    Every stage gets ``text_mask [b, T]`` as a keyword. The last stage returns the prediction
    ``[b, N_target, 4C]``; others return ``(img, txt, temb)``. Patch grids and the target token
    count are static per step and set with `set_shapes`.
    """

    def __init__(self, model: QwenImageMMDiT, precision: Precision):
        super().__init__()
        self.model = model
        self.precision = precision
        self._shapes: list | None = None
        self._num_target: int | None = None

    def set_shapes(self, img_shapes: list, num_target_tokens: int) -> None:
        self._shapes = img_shapes
        self._num_target = num_target_tokens

    def forward(self, *inputs: torch.Tensor, text_mask: torch.Tensor):
        if self._shapes is None:
            raise RuntimeError("MMDiTStage.set_shapes must be called before forward")
        m = self.model
        b = text_mask.shape[0]
        shapes = self._shapes[:1] * b
        with self.precision.forward_context():
            if m.pre_process:
                hidden, text, sigma = inputs
                img, txt, temb = m.embed(hidden.transpose(0, 1), text.transpose(0, 1), sigma)
            else:
                img, txt, temb = inputs
            img, txt = m.run_blocks(img, txt, temb, shapes, text_mask)
            if m.post_process:
                return m.head(img, temb, self._num_target).transpose(0, 1).float()
        return img, txt, temb
