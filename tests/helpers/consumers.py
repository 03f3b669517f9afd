"""Helpers for the consumers' multi-rank tests: spawn gloo worlds, synthetic global batches,
run configs and the training command lines that run them."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import psutil
import torch
import torch.multiprocessing as mp
import yaml

from consumers.batch import Batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_rank_env():
    """The environment torchrun exports for a one-rank world (a free local port), set for the
    duration of the block: for tests that run the consumers in the pytest process."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        for k, v in dict(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        ).items():
            mp.setenv(k, v)
        yield


def _entry(rank: int, world: int, port: int, fn, out_dir: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
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
        mp.start_processes(
            _entry, args=(world, free_port(), fn, str(out_dir), args), nprocs=world, start_method="spawn"
        )
    except Exception as exc:
        errors = sorted(out_dir.glob("*.error"))
        detail = "\n".join(p.read_text() for p in errors)
        raise AssertionError(f"worker failed: {exc}\n{detail}") from None
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in out_dir.glob("rank*.json")}


def synthetic_global_batch(
    step: int, global_batch: int, *, channels: int = 16, text_dim: int = 32, task: str = "t2i", seed: int = 1234
) -> list[dict]:
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
        out.append(
            Batch(
                latents=torch.stack([samples[i]["latents"] for i in idx]),
                text=text,
                text_mask=mask,
                sample_index=torch.tensor(idx),
                condition_latents=cond,
                task=task,
            )
        )
    return out


def write_cache(
    path,
    *,
    samples_per_bucket: int = 8,
    buckets=((32, 32),),
    edit: int = 0,
    seed: int = 0,
    partition: str = "p0",
    distinct: int | None = None,
) -> str:
    """A small latent cache written with the producers' writer (`publish_partition`) + one snapshot.

    Latents are 16-channel (tiny VAE), text 32-dim (tiny text encoder), i.e. model `tiny-16ch`.
    `distinct`: only this many different (latent, text) contents, repeated (ids stay unique).
    """
    from megatron_qwenimage.cache import init_cache

    cache = init_cache(str(path))
    _publish(cache, partition, samples_per_bucket, buckets, edit=edit, seed=seed, distinct=distinct)
    return str(path)


def grow_cache(path, partition: str, *, samples_per_bucket: int = 8, buckets=((32, 32),), seed: int = 1) -> int:
    """Commit one more partition of `write_cache`-like samples to the cache at `path` and publish a
    snapshot, as a producer does while a ``tail`` consumer trains; returns the new snapshot version."""
    from megatron_qwenimage.cache import open_cache

    return _publish(open_cache(str(path)), partition, samples_per_bucket, buckets, seed=seed).version


def _publish(cache, partition: str, samples_per_bucket: int, buckets, *, edit=0, seed=0, distinct=None):
    """Commit partition `partition` (one shard per bucket, random samples drawn from `seed`) to
    `cache`, then publish a snapshot; returns it."""
    from megatron_qwenimage.cache import Bucket, SampleMeta, ShardTensors
    from megatron_qwenimage.cache.shard_format import offsets_from_lengths
    from megatron_qwenimage.cache.writer import ShardPayload, publish_partition

    g = torch.Generator().manual_seed(seed)
    payloads = []
    for bh, bw in buckets:
        bucket = Bucket(bh, bw)
        n = samples_per_bucket
        lengths = [int(x) for x in torch.randint(3, 9, (n,), generator=g)]
        latents = torch.randn(n, 16, bucket.latent_height, bucket.latent_width, generator=g)
        cond = torch.randn(n, 16, bucket.latent_height, bucket.latent_width, generator=g) if edit else None
        if distinct:
            lengths = [lengths[i % distinct] for i in range(n)]
            latents = latents[[i % distinct for i in range(n)]]
        text = torch.randn(sum(lengths), 32, generator=g)
        if distinct:
            offs = offsets_from_lengths(lengths)
            for i in range(distinct, n):
                j = i % distinct
                text[offs[i] : offs[i + 1]] = text[offs[j] : offs[j + 1]]
        text = text.to(torch.bfloat16)
        metas = [
            SampleMeta(
                f"{partition}-{bucket.name}-{i}",
                "edit" if i >= n - edit else "t2i",
                f"caption {i}",
                f"file://x/{i}.png",
                f"file://x/src{i}.png" if i >= n - edit else None,
                lengths[i],
                False,
                bh,
                bw,
            )
            for i in range(n)
        ]
        if cond is not None:
            cond[: n - edit] = 0
        payloads.append(
            ShardPayload(
                bucket,
                ShardTensors(
                    latents.to(torch.bfloat16),
                    text,
                    offsets_from_lengths(lengths),
                    None if cond is None else cond.to(torch.bfloat16),
                ),
                metas,
            )
        )
    assert publish_partition(cache.storage, partition, inputs=len(buckets) * samples_per_bucket, shards=payloads).won
    return cache.create_snapshot()


def run_config(
    cache: str,
    out: Path,
    *,
    steps: int,
    global_batch: int = 4,
    micro_batch: int = 1,
    parallel: dict | None = None,
    ckpt_interval: int = 0,
    lr: float = 1e-3,
    **extra,
) -> dict:
    """A run YAML mapping for `tiny-16ch` on `cache`, metrics every step."""
    cfg = {
        "model": {"name": "tiny-16ch", "num_layers": 2},
        "parallel": parallel or {},
        "optimizer": {"lr": lr, "warmup_steps": 2, "clip_grad": 1.0},
        "flow_matching": {"kind": "uniform"},
        "data": {
            "caches": [{"path": cache}],
            "seed": 3,
            "prefetch_steps": 2,
            "stages": [{"name": "s0", "buckets": ["32x32"], "micro_batch": micro_batch, "global_batch": global_batch}],
        },
        "schedule": {"train_steps": steps, "seed": 11},
        "logging": {"dir": str(out / "logs"), "interval": 1, "tensorboard": False},
    }
    if ckpt_interval:
        cfg["checkpoint"] = {"dir": str(out / "ckpt"), "interval": ckpt_interval, "keep_last": 2}
    for section, values in extra.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_run_config(cfg: dict, path: Path) -> Path:
    """Write the run-config mapping `cfg` to `path` as YAML; returns `path`."""
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_tp2_checkpointing_config(cache: str, out: Path, *, steps: int, interval: int, async_save: bool) -> Path:
    """Create `out` and write ``out/run.yaml``: `steps` steps of TP=2 on `cache` (global batch 4,
    micro-batch 1), a checkpoint every `interval` steps (`async_save`, the last 5 kept); returns
    its path. The run of the kill / signal and resume tests."""
    out.mkdir(parents=True)
    cfg = run_config(
        cache,
        out,
        steps=steps,
        global_batch=4,
        micro_batch=1,
        ckpt_interval=interval,
        parallel={"tp": 2},
        checkpoint={"async_save": async_save, "keep_last": 5},
    )
    return write_run_config(cfg, out / "run.yaml")


# ------------------------------------------------------------------------------------------------
# Training in a child process: the trainer module or the user command, alone or under torchrun.

REPO = Path(__file__).resolve().parents[2]
#: The environment of a training process: one intra-op thread per rank, this checkout importable.
TRAIN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
#: ``python -m`` entry points that train on ``--config``: the trainer module and the user command.
CONSUMERS_TRAIN = ("consumers.train",)
QWENIMAGE_TRAIN = ("megatron_qwenimage.cli", "train")


def train_command(config: Path, *, entry: Sequence[str] = CONSUMERS_TRAIN, nproc: int = 1) -> list[str]:
    """``python -m <entry> --config <config>``: as it is for one process, under
    ``torch.distributed.run`` with `nproc` local ranks (127.0.0.1, a free port) otherwise."""
    train = ["-m", *entry, "--config", str(config)]
    if nproc == 1:
        return [sys.executable, *train]
    rendezvous = [f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, *train]


def run_train(
    config: Path,
    *,
    entry: Sequence[str] = CONSUMERS_TRAIN,
    nproc: int = 1,
    env: dict | None = None,
    timeout: float | None = 240,
) -> subprocess.CompletedProcess:
    """Run `train_command` to its end from the repository root with `TRAIN_ENV` (updated with
    `env`); stdout and stderr are captured as text."""
    return subprocess.run(
        train_command(config, entry=entry, nproc=nproc),
        cwd=REPO,
        env={**TRAIN_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def launch_train(config: Path, *, entry: Sequence[str] = CONSUMERS_TRAIN, nproc: int = 1) -> subprocess.Popen:
    """Start `train_command` from the repository root with `TRAIN_ENV`, in a session of its own
    (a test signals the job, never itself); stdout and stderr go to one text pipe."""
    return subprocess.Popen(
        train_command(config, entry=entry, nproc=nproc),
        cwd=REPO,
        env=TRAIN_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


class JobOutput:
    """The merged output of a `launch_train` job, read line by line in a thread as it runs, so a
    test can wait for a log line (`wait_for`) without blocking the job on a full pipe."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float = 240) -> None:
        """Wait until a line containing `needle` was printed (fails if the job ends first)."""
        deadline = time.monotonic() + timeout
        while not any(needle in line for line in list(self.lines)):
            assert self.proc.poll() is None or self._thread.is_alive(), f"ended before {needle!r}:\n{self.text[-3000:]}"
            assert time.monotonic() < deadline, f"no {needle!r} within {timeout}s:\n{self.text[-3000:]}"
            time.sleep(0.05)

    def wait(self, timeout: float = 300) -> int:
        """Wait for the job to end; returns its exit code."""
        self.proc.wait(timeout=timeout)
        self._thread.join(timeout=30)
        return self.proc.returncode


def wait_success(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for a `launch_train` job to end, assert it exited 0 (the output's tail as the message)
    and return its output."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def torchrun_worker(proc: subprocess.Popen, rank: int) -> psutil.Process:
    """The training worker of the torchrun job `proc` whose environment says ``RANK=<rank>``."""
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "--config" in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no worker with RANK={rank} under torchrun {proc.pid}")


def wait_for_logged_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 240) -> None:
    """Wait until the job `proc` has logged `step` (steps completed) to its `metrics` JSONL."""
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and any(r.get("step") == step for r in read_jsonl(metrics))):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"step {step} was not logged within {timeout}s"
        time.sleep(0.05)


def vouch_for(step_dir: Path, rel: str) -> None:
    """Make checkpoint `step_dir`'s COMMITTED record vouch for its file `rel` as it is now (size and
    sha256), as a tamperer who rewrites the record too would: only the file's content is wrong."""
    import hashlib

    from consumers.checkpoint import COMMITTED

    record = json.loads((step_dir / COMMITTED).read_text())
    data = (step_dir / rel).read_bytes()
    record["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step_dir / COMMITTED).write_text(json.dumps(record))


def committed_steps(ckpt_dir: Path) -> list[int]:
    """The steps of the committed checkpoints (``step_N/COMMITTED``) under `ckpt_dir`, sorted."""
    return sorted(int(p.name[5:]) for p in Path(ckpt_dir).glob("step_*") if (p / "COMMITTED").is_file())


def signal_job(proc: subprocess.Popen, sig: int) -> list[psutil.Process]:
    """Send `sig` to torchrun (`proc`) and every process under it at once, as a scheduler signals
    a job step (torchrun's workers do not all stay in its process group); returns them."""
    tree = [psutil.Process(proc.pid)]
    tree += tree[0].children(recursive=True)
    for p in tree:
        p.send_signal(sig)
    return tree


# ------------------------------------------------------------------------------------------------
# Leaving the adaLN-Zero init, gathering full training state, comparing it (layout and checkpoint
# tests). At the adaLN-Zero init every modulation and `proj_out` is zero, so attention, MLP,
# QK-norm, text-stream and timestep-embedder gradients are zero or negligible for the first steps:
# a layout that dropped them would still match a reference on loss and grad norm. These helpers
# make every tensor matter and compare *every* parameter and optimizer-state tensor by name.

PERTURB_STD = 0.1


def perturbation(name: str, shape, *, seed: int = 0, std: float = PERTURB_STD) -> torch.Tensor:
    """The full fp32 tensor that replaces the zero-initialised tensor `name` (layout-independent:
    drawn from a CPU generator seeded by ``(seed, name)``, like `QwenImageMMDiT.init_weights`)."""
    import zlib

    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) + 17) % 2**63)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32) * std


def owned_rows(rows: int, dp: int, dp_rank: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of a (TP-shard) tensor whose optimizer state DP rank `dp_rank` owns
    (`consumers.optimizer`: ``torch.chunk`` semantics, chunk ``ceil(rows / dp)``)."""
    chunk = -(-rows // dp)
    start = min(dp_rank * chunk, rows)
    return start, min(start + chunk, rows)


@torch.no_grad()
def perturb_zero_init(chunks, optimizer=None, *, seed: int = 0, std: float = PERTURB_STD) -> list[str]:
    """Replace every model tensor that is exactly zero (what adaLN-Zero `init_weights` zeroes:
    modulation weights and biases, ``norm_out``, ``proj_out``, the zero biases, the carried
    ``mod_tail`` buffers) with `perturbation` of its full tensor, sharded by the model's own
    ``shard_of``; so every TP / PP layout gets the same model as a single-process one.

    Call right after building the model chunks. With `optimizer` (a
    `consumers.optimizer.DistributedOptimizer` built on them), its fp32 master copies (and EMA)
    are overwritten with the same values through ``state_tensors()`` (the per-name live views a
    checkpoint load writes), and ``load_master_into_params()`` is checked to leave the model
    unchanged (collective over DP, like a checkpoint load). Returns the canonical names perturbed
    on this rank.
    """
    perturbed: dict[str, torch.Tensor] = {}
    params: dict[str, torch.Tensor] = {}
    # ZeRO-3 frees the parameters between uses: gather them to read and perturb them.
    with optimizer.gathered_params() if optimizer is not None else contextlib.nullcontext():
        for chunk in chunks:
            for name, t in chunk.named_model_tensors():
                if isinstance(t, torch.nn.Parameter):
                    params[name] = t
                if t.any():
                    continue
                shard = chunk.shard_of(name, perturbation(name, chunk.full_shape(name, t), seed=seed, std=std))
                t.copy_(shard)
                perturbed[name] = shard
        before = {n: p.detach().clone() for n, p in params.items()}
    if optimizer is not None:
        state = optimizer.state_tensors()
        for name, shard in perturbed.items():
            if name not in state:
                continue  # a carried buffer: no optimizer state
            start, end = owned_rows(shard.shape[0], optimizer.dp, optimizer.dp_rank)
            for kind in ("master", "ema"):
                if kind in state[name]:
                    dst = state[name][kind]
                    assert tuple(dst.shape) == tuple(shard[start:end].shape), (name, kind, dst.shape, shard.shape)
                    dst.copy_(shard[start:end])
        optimizer.load_master_into_params()
        with optimizer.gathered_params():
            for n, p in params.items():
                if not torch.equal(p.detach(), before[n]):
                    raise AssertionError(f"perturb_zero_init: master weights of {n} disagree with the model")
    return sorted(perturbed)


#: Parameter groups whose gradients the adaLN-Zero init hides (regex on canonical names).
GRAD_GROUPS = {
    "text_stream": r"^(txt_in|txt_norm)\.|\.txt_",
    "timestep_embedder": r"^time_embedder\.",
    "attention": r"\.(img|txt)_(qkv|kv|q_norm|k_norm|out)\.",
    "mlp": r"_mlp\.",
    "modulation": r"_mod\.",
    "head": r"^(norm_out|proj_out)\.",
}


def group_grad_norms(named_grads) -> dict[str, float]:
    """L2 norm of the gradients in each of `GRAD_GROUPS` and ``"total"`` (full, unsharded grads)."""
    import re

    sq = {g: 0.0 for g in GRAD_GROUPS}
    total = 0.0
    for name, g in named_grads:
        s = float(g.detach().double().square().sum())
        total += s
        for group, pattern in GRAD_GROUPS.items():
            if re.search(pattern, name):
                sq[group] += s
    return {**{g: v**0.5 for g, v in sq.items()}, "total": total**0.5}


OPT_KINDS = ("master", "exp_avg", "exp_avg_sq", "ema")


def gather_training_state(engine, dst: int = 0):
    """Every trainable tensor of a `consumers.engine.TrainEngine`, unsharded, on global rank `dst`.

    Returns (on `dst`; None elsewhere) ``(state, replica_diff)``: ``state[name]`` maps ``"param"``
    and the optimizer's ``"master"``, ``"exp_avg"``, ``"exp_avg_sq"`` (and ``"ema"``) to full fp32
    tensors (TP shards concatenated along the partition dim, DP-owned row chunks along dim 0, PP
    stages merged by canonical name); ``replica_diff[name]`` is the largest difference between
    copies that must be equal (a parameter on its DP replicas, a TP-replicated tensor on its TP
    ranks). Collective over the whole world.
    """
    import torch.distributed as dist

    from consumers.pipeline import named_trainable

    ps = engine.pstate
    opt_state = engine.optimizer.state_tensors()
    local = {}
    # The last update's gathers may still be in flight (ZeRO-3: the parameters are freed).
    with engine.optimizer.gathered_params():
        for name, p, tp_dim in named_trainable(engine.chunks):
            entry = {"param": p.detach().float().cpu().clone(), "tp_dim": tp_dim}
            for kind, t in opt_state[name].items():
                entry[kind] = t.detach().float().cpu().clone()
            local[name] = entry
    payload = ((ps.pp_rank, ps.tp_rank, ps.dp_rank), local)
    gathered = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(payload, gathered, dst=dst)
    if gathered is None:
        return None
    tp, dp, shard = ps.layout.tp, ps.layout.dp, ps.layout.shard_size
    pieces: dict[str, dict[tuple[int, int], dict]] = {}
    for (_, tp_rank, dp_rank), entries in gathered:
        for name, entry in entries.items():
            pieces.setdefault(name, {})[(tp_rank, dp_rank)] = entry
    state, replica_diff = {}, {}
    for name, by_coord in pieces.items():
        if len(by_coord) != tp * dp:
            raise AssertionError(f"{name}: held by {sorted(by_coord)}, expected every (tp, dp) of one stage")
        tp_dim = by_coord[(0, 0)]["tp_dim"]
        diff = 0.0
        tp_shards: dict[str, list[torch.Tensor]] = {}
        for t in range(tp):
            base = by_coord[(t, 0)]["param"]
            for d in range(dp):
                diff = max(diff, float((by_coord[(t, d)]["param"] - base).abs().max()))
            if tp_dim is None:
                diff = max(diff, float((base - by_coord[(0, 0)]["param"]).abs().max()))
            tp_shards.setdefault("param", []).append(base)
            for kind in OPT_KINDS:
                if kind in by_coord[(t, 0)]:
                    # Chunks over the shard group (HSDP: the first replica's; the others must equal it).
                    tp_shards.setdefault(kind, []).append(torch.cat([by_coord[(t, d)][kind] for d in range(shard)]))
                    for d in range(shard, dp):
                        got, first = by_coord[(t, d)][kind], by_coord[(t, d % shard)][kind]
                        diff = max(diff, float((got - first).abs().max()) if got.numel() else 0.0)
        full = {}
        for kind, shards in tp_shards.items():
            if tp_dim is None:
                for s in shards[1:]:
                    diff = max(diff, float((s - shards[0]).abs().max()))
                full[kind] = shards[0]
            else:
                full[kind] = torch.cat(shards, dim=tp_dim)
        state[name] = full
        replica_diff[name] = diff
    return state, replica_diff


def compare_states(got: dict, ref: dict, *, rtol: float = 1e-4, scale_atol: float = 1e-5, atol: float = 0.0):
    """Compare per-name dicts of kind -> tensor (`gather_training_state`'s layout) element-wise:
    ``|got - ref| <= atol + scale_atol * max|ref| + rtol * |ref|`` per tensor (the absolute part
    scales with the reference tensor, so AdamW moments, ~g and ~g², are compared at their own
    magnitude instead of vanishing under an absolute tolerance made for weights).

    Returns ``(mismatches, worst)``: ``mismatches["name/kind"]`` describes each tensor out of
    tolerance (a name or kind present on one side only counts too); ``worst[kind]`` is
    ``(ratio, name)`` of the largest ``|got - ref| / tolerance`` seen for that kind (< 1 passes),
    for reporting the margin.
    """
    mismatches: dict[str, str] = {}
    worst: dict[str, float] = {}
    for name in sorted(set(got) | set(ref)):
        if name not in got or name not in ref:
            mismatches[f"{name}/*"] = "missing in " + ("layout" if name not in got else "reference")
            continue
        for kind in sorted(set(got[name]) | set(ref[name])):
            if kind not in got[name] or kind not in ref[name]:
                mismatches[f"{name}/{kind}"] = "kind missing on one side"
                continue
            g, r = got[name][kind].double(), ref[name][kind].double()
            if g.shape != r.shape:
                mismatches[f"{name}/{kind}"] = f"shape {tuple(g.shape)} != {tuple(r.shape)}"
                continue
            rmax = float(r.abs().max()) if r.numel() else 0.0
            tol_abs = max(atol + scale_atol * rmax, 1e-30)
            ratio = float(((g - r).abs() / (tol_abs + rtol * r.abs())).max()) if r.numel() else 0.0
            if ratio > worst.get(kind, (-1.0, ""))[0]:
                worst[kind] = (ratio, name)
            if not ratio <= 1.0:
                err = float((g - r).abs().max())
                mismatches[f"{name}/{kind}"] = f"max |diff| {err:.3g} (max |ref| {rmax:.3g}, {ratio:.3g}x tolerance)"
    return mismatches, worst


def corrupt_latent_chunk(cache: str):
    """Flip the last byte of one latent chunk of the first shard of `cache`'s snapshot (same size,
    wrong sha256); returns that shard. A corrupted samples.parquet would fail earlier, in the
    planner; a latent chunk fails where the shard is opened and verified."""
    from megatron_qwenimage.cache import open_cache

    shard = open_cache(cache).snapshot().shards[0]
    victim = sorted(
        p
        for p in Path(cache, shard.path, "tensors.zarr", "latents").rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    return shard
