"""megatron-qwenimage: the Qwen-Image MMDiT on megatron-core, its producers and consumers.

Public API::

    from megatron_qwenimage import MMDiTConfig, QwenImageMMDiT, load_config

The model classes import torch and megatron-core; they are loaded on first use so that the
command line and config tools stay quick to start.
"""

from megatron_qwenimage.config import ConfigError, MMDiTConfig, available_configs, load_config

__all__ = ["ConfigError", "MMDiTConfig", "QwenImageMMDiT", "available_configs", "load_config"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "QwenImageMMDiT":
        from megatron_qwenimage.model.mmdit import QwenImageMMDiT

        return QwenImageMMDiT
    raise AttributeError(f"module 'megatron_qwenimage' has no attribute {name!r}")
