"""Helpers for the consumers' multi-rank tests: spawn gloo worlds, synthetic global batches."""

from __future__ import annotations

import json
import os
import socket
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from consumers.step import Batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, out_dir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        result = fn(rank, world, *args)
        if result is not None:
            Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    except BaseException:
        Path(out_dir, f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        from consumers.parallel import shutdown

        shutdown()


def spawn(fn, world: int, out_dir: Path, *args) -> dict[int, dict]:
    """Run ``fn(rank, world, *args)`` on `world` gloo ranks; returns rank -> returned JSON value."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        mp.start_processes(_entry, args=(world, free_port(), fn, str(out_dir), args), nprocs=world,
                           start_method="spawn")
    except Exception as exc:
        errors = sorted(out_dir.glob("*.error"))
        detail = "\n".join(p.read_text() for p in errors)
        raise AssertionError(f"worker failed: {exc}\n{detail}") from None
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in out_dir.glob("rank*.json")}


def synthetic_global_batch(step: int, global_batch: int, *, channels: int = 16, text_dim: int = 32,
                           task: str = "t2i", seed: int = 1234) -> list[dict]:
    """`global_batch` samples of one bucket for `step` (bucket and text lengths vary by step)."""
    g = torch.Generator().manual_seed(seed + step)
    h, w = [(8, 8), (8, 12), (12, 8)][step % 3]
    samples = []
    for _ in range(global_batch):
        n_text = int(torch.randint(3, 9, (1,), generator=g))
        sample = {
            "latents": torch.randn(channels, h, w, generator=g),
            "text": torch.randn(n_text, text_dim, generator=g),
        }
        if task == "edit":
            sample["condition"] = torch.randn(channels, h, w, generator=g)
        samples.append(sample)
    return samples


def to_microbatches(samples: list[dict], *, dp_rank: int, dp: int, micro_batch: int, task: str = "t2i") -> list[Batch]:
    """This DP rank's contiguous slice of the global batch, split into micro-batches; text padded
    to the global batch's longest text."""
    g = len(samples)
    t_max = max(s["text"].shape[0] for s in samples)
    per_rank = g // dp
    out = []
    for start in range(dp_rank * per_rank, (dp_rank + 1) * per_rank, micro_batch):
        idx = list(range(start, start + micro_batch))
        text = torch.zeros(len(idx), t_max, samples[0]["text"].shape[1])
        mask = torch.zeros(len(idx), t_max, dtype=torch.bool)
        for j, i in enumerate(idx):
            n = samples[i]["text"].shape[0]
            text[j, :n] = samples[i]["text"]
            mask[j, :n] = True
        cond = [torch.stack([samples[i]["condition"] for i in idx])] if task == "edit" else []
        out.append(Batch(latents=torch.stack([samples[i]["latents"] for i in idx]), text=text, text_mask=mask,
                         sample_index=torch.tensor(idx), condition_latents=cond, task=task))
    return out
