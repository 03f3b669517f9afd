"""The training-data reader: cache snapshots -> per-rank micro-batches (consumers only).

* `reader_config`: the ``data:`` section of a run's YAML (`ReaderConfig`), the training `TASKS`.
* `mixing`: `Planner`, the global sample order (curriculum stages, task/cache weights, epochs).
* `agreement`: ranks agreeing on snapshots and plans (`TorchDistributedAgreement`).
* `reader`: `CacheReader` / `ValidationReader`, loading and collating what the planner chose.

It reads caches through the contract in `megatron_qwenimage.cache` (docs/cache_format.md);
docs/training_data.md describes the reader.
"""

from megatron_qwenimage.data.agreement import RankAgreement, SingleProcess, TorchDistributedAgreement
from megatron_qwenimage.data.mixing import EndOfData, ReaderError, StepPlan, TailTimeoutError
from megatron_qwenimage.data.reader import CacheReader, MicroBatch, ValidationReader
from megatron_qwenimage.data.reader_config import (
    TASK_SAMPLE_KIND,
    TASKS,
    CacheSource,
    ReaderConfig,
    StageConfig,
    ValidationConfig,
)

__all__ = [
    "TASKS",
    "TASK_SAMPLE_KIND",
    "CacheReader",
    "CacheSource",
    "EndOfData",
    "MicroBatch",
    "RankAgreement",
    "ReaderConfig",
    "ReaderError",
    "SingleProcess",
    "StageConfig",
    "StepPlan",
    "TailTimeoutError",
    "TorchDistributedAgreement",
    "ValidationConfig",
    "ValidationReader",
]
