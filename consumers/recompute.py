"""Activation recompute: none / selective (core attention) / full every N blocks
(``torch.utils.checkpoint``, set on the model by `QwenImageMMDiT.configure_recompute`)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_qwenimage.config import ConfigError
from megatron_qwenimage.model.mmdit import QwenImageMMDiT

RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class RecomputeConfig:
    """Activation recompute.

    Attributes:
        mode: "none" (the report's choice); "selective": recompute the core attention of every
            block (Megatron's selective recompute); "full": recompute whole blocks.
        every_n: with "full", blocks whose global index is a multiple of `every_n` are recomputed
            (1 = every block).
    """

    mode: str = "none"
    every_n: int = 1

    def __post_init__(self) -> None:
        if self.mode not in RECOMPUTE_MODES:
            raise ConfigError(f"recompute.mode={self.mode!r}: expected one of {RECOMPUTE_MODES}")
        if not isinstance(self.every_n, int) or self.every_n < 1:
            raise ConfigError(f"recompute.every_n={self.every_n!r}: expected a positive integer")


def apply_recompute(model: QwenImageMMDiT, config: RecomputeConfig) -> list[str]:
    """Set the model's activation recompute policy; returns what is recomputed."""
    return model.configure_recompute(config.mode, config.every_n)
