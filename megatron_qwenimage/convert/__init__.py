"""Checkpoints of `QwenImageMMDiT`: diffusers' ``QwenImageTransformer2DModel`` format and ours.

Which tensor of ours is made from which diffusers tensor(s) (fused per-head QKV, TP split dims, the
last block's carried buffers) is the rules table of `megatron_qwenimage.model.state_dict_names`,
next to the model; this package reads and writes files through it, and the model imports nothing
of it.

Import reads, for every tensor, only this TP rank's slice of each source (``safe_open().get_slice``),
so a rank never holds another rank's weights. Export gathers the shards over TP, inverts each rule
and writes a diffusers directory (``config.json`` + safetensors, sharded with an index when large)
that ``QwenImageTransformer2DModel.from_pretrained`` loads.

The *native* format is the same idea with our own canonical names: ``model.safetensors`` (or shards
+ ``model.safetensors.index.json``) holding every full (unsharded) tensor, and ``mmdit_config.json``
holding the `MMDiTConfig`. Any TP/PP layout loads it by reading its slices. `convert_checkpoint`
streams between the two formats one tensor at a time, without building the model.

Modules, one job each:

* `formats`: the files of each format, `checkpoint_format` detection, config files, `CheckpointError`;
* `sources`: `TensorSource` (`SafetensorsDirSource`, `StateDictSource`) and the checks a source
  passes before anything is read;
* `writer`: `write_checkpoint`, the one writer (sharded safetensors + config);
* `api`: `load_diffusers`, `load_native`, `save_diffusers`, `save_native`, `save_full_state`,
  `convert_checkpoint`.
"""

from megatron_qwenimage.convert.api import (
    convert_checkpoint,
    gather_full_state,
    load_diffusers,
    load_native,
    save_diffusers,
    save_full_state,
    save_native,
)
from megatron_qwenimage.convert.formats import (
    CONFIG_NAME,
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_NAME,
    NATIVE_CONFIG_NAME,
    NATIVE_INDEX_NAME,
    NATIVE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    checkpoint_format,
)
from megatron_qwenimage.convert.sources import SafetensorsDirSource, StateDictSource, TensorSource
from megatron_qwenimage.convert.writer import ShardedSafetensorsWriter, write_checkpoint

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_MAX_SHARD_BYTES",
    "INDEX_NAME",
    "NATIVE_CONFIG_NAME",
    "NATIVE_INDEX_NAME",
    "NATIVE_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "CheckpointError",
    "SafetensorsDirSource",
    "ShardedSafetensorsWriter",
    "StateDictSource",
    "TensorSource",
    "checkpoint_format",
    "convert_checkpoint",
    "gather_full_state",
    "load_diffusers",
    "load_native",
    "save_diffusers",
    "save_full_state",
    "save_native",
    "write_checkpoint",
]
