"""DP communication overlap: how much of the distributed optimizer's reduce-scatter and all-gather
time the overlapping engine hides behind compute, against today's engine, on gloo ranks.

Both engines are `consumers.optimizer.DistributedOptimizer` (ZeRO-1, fp32 master, AdamW) over
the same model, one DP unit per block:

* ``today``: ``DataParallelConfig(overlap_grad_reduce=False, overlap_param_gather=False)``: every
  reduce-scatter after the backward, every all-gather right after the update;
* ``new``: ``overlap_grad_reduce=True, overlap_param_gather=True``: each unit's reduce-scatter is
  launched by the gradient hooks as soon as the backward of the last micro-batch has left the
  unit; the all-gathers are launched after the update (``param_gather_depth`` in flight) and each
  is waited by a forward pre-hook right before its unit's forward in the next step.

The model is a stack of MLP blocks (Linear d->4d, GELU, Linear 4d->d, residual, LayerNorm). Each
rank (spawned on 127.0.0.1, gloo, one torch thread) times, per engine, medians over the timed
iterations after warm-up, a barrier between phases, the phases interleaved over ``--rounds``:

* ``compute``: the full training iteration (zero_grad, forward + backward of every micro-batch,
  step: grad norm, AdamW, the copies into the parameters) with the two DP collectives the
  optimizer calls (``consumers.optimizer.reduce_scatter_single`` / ``all_gather_single``)
  replaced by no-ops that return a finished work: the step without its DP communication cost (a
  real step first fills the buffers they leave untouched, so every value stays finite). The
  grad-norm all-reduce (one scalar) stays;
* ``comm``: the same reduce-scatters and all-gathers (the same sizes and dtypes, one pair per
  unit) issued back to back with no compute: every reduce-scatter launched then waited (reverse
  unit order), then the all-gathers in forward order with ``param_gather_depth`` in flight;
* ``step``: the full iteration with the real collectives, timed from one iteration's start to the
  next (so the new engine's gathers, waited in the next forward, are inside the time).

``hidden_fraction = clamp((compute + comm - step) / comm, 0, 1)`` (rank means of the per-rank
medians), ``step_ratio_to_today`` = this engine's step / today's step (< 1: faster) and
``saved_vs_today_fraction = (today's step - this step) / comm`` (the share of the communication
time the engine removes from today's step; unclamped). Today's engine is the control: its
collectives do not overlap anything, so its hidden fraction should be about 0 and measures the
method's bias. The order evidence also gives the time the ranks blocked in the collectives'
``wait()``: communication that progressed in the background is not waited for.

Order evidence (one instrumented pair of iterations per engine, the collectives wrapped to
record when they are issued): whether the first reduce-scatter was issued before the backward
of the last micro-batch returned, how many were, how many all-gathers were issued during the
next forward, and how many units the forward hooks waited for. A probe first checks whether an
``async_op=True`` gloo collective returns before its peers join (rank 0 joins late): if it does
not, no overlap is possible and the output says so (the order is still reported).

Honesty on a small CPU machine: gloo's communication runs on its own threads in each rank's
process, and on loopback "communication" is CPU work (socket copies, the reduction). When the
ranks' compute threads already occupy every core (2 ranks on 2 cores; 4 ranks oversubscribe
them), the collectives can only run by taking CPU from the compute they should hide behind:
communication that progresses in the background shows up as slower compute, and the measured
hidden fraction understates what the engine's ordering allows where communication has its own
hardware (NCCL on a GPU). With more ranks than cores the phases timed alone also miss that, in the
full step, one rank's communication (partly waiting on its peers) runs while another computes,
which can give even today's engine a hidden fraction: there, compare the engines with each other.
The output flags both (``cores_per_rank``, ``note``).

Command lines::

    python benchmarks/dp_overlap.py                    # 2 and 4 ranks, readable table
    python benchmarks/dp_overlap.py --json             # one JSON line per (engine, ranks)
    python benchmarks/dp_overlap.py --ranks 2 --microbatches 4 --blocks 12 --dim 256 --tokens 256
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import consumers.optimizer as optimizer_module
from consumers.data_parallel import DataParallelConfig
from consumers.optimizer import DistributedOptimizer, OptimizerConfig

ENGINES = ("today", "new")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONFIG = OptimizerConfig(lr=1e-4, weight_decay=0.1, clip_grad=1.0)
#: How long rank 0 joins late in the async probe; a call that returns in under half of it did not wait.
PROBE_DELAY_S = 0.3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="DP world sizes (default: %(default)s)")
    p.add_argument("--blocks", type=int, default=8, help="MLP blocks = DP units (default: %(default)s)")
    p.add_argument("--dim", type=int, default=256, help="block width d (4d hidden; default: %(default)s)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per micro-batch per rank (default: %(default)s)")
    p.add_argument("--microbatches", type=int, default=1, help="micro-batches per step (default: %(default)s)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="parameter dtype (default: %(default)s)")
    p.add_argument(
        "--grad-reduce-dtype", choices=("float32", "bfloat16"), default="float32", help="default: %(default)s"
    )
    p.add_argument("--gather-depth", type=int, default=2, help="param_gather_depth (default: %(default)s)")
    p.add_argument("--iters", type=int, default=2, help="timed iterations per phase per round (default: %(default)s)")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed iterations per phase first (>= 1; default: %(default)s)"
    )
    p.add_argument(
        "--rounds", type=int, default=6, help="rounds interleaving engines and phases (default: %(default)s)"
    )
    p.add_argument("--json", action="store_true", help="one JSON line per (engine, ranks) instead of a table")
    return p


# ---------------------------------------------------------------------------------------- model
class Block(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, 4 * d)
        self.fc2 = torch.nn.Linear(4 * d, d)
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))


class Stack(torch.nn.Module):
    def __init__(self, blocks: int, d: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(d) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class _Done:
    """A finished collective (what the no-op stand-ins return)."""

    def wait(self, *args, **kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _noop_collective(output, input, *args, async_op: bool = False, **kwargs):
    return _Done() if async_op else None


class Collectives:
    """Swaps the optimizer's module-level collectives: real, no-ops, or real and recorded."""

    def __init__(self):
        self.real = (optimizer_module.reduce_scatter_single, optimizer_module.all_gather_single)
        self.log: list[dict] | None = None

    def use_real(self) -> None:
        optimizer_module.reduce_scatter_single, optimizer_module.all_gather_single = self.real

    def use_noop(self) -> None:
        optimizer_module.reduce_scatter_single = _noop_collective
        optimizer_module.all_gather_single = _noop_collective

    def use_recording(self) -> list[dict]:
        """Real collectives, each logged as ``{"t", "kind", "wait_s"}``: when it was issued and how long
        the caller then blocked in its ``wait()``."""
        self.log = log = []
        rs, ag = self.real

        def recorded(kind, fn):
            def issue(*args, **kwargs):
                entry = {"t": time.perf_counter(), "kind": kind, "wait_s": 0.0}
                log.append(entry)
                work = fn(*args, **kwargs)
                return _TimedWork(work, entry) if work is not None else None

            return issue

        optimizer_module.reduce_scatter_single = recorded("reduce_scatter", rs)
        optimizer_module.all_gather_single = recorded("all_gather", ag)
        return log


class _TimedWork:
    """A collective's work whose ``wait()`` adds the time it blocked to its log entry."""

    def __init__(self, work, entry: dict):
        self.work, self.entry = work, entry

    def wait(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.work.wait(*args, **kwargs)
        finally:
            self.entry["wait_s"] += time.perf_counter() - t0

    def is_completed(self) -> bool:
        return self.work.is_completed()


class Engine:
    """One engine's model, optimizer, inputs and comm-only buffers on this rank."""

    def __init__(self, name: str, args: argparse.Namespace, rank: int, world: int):
        self.name = name
        dtype = DTYPES[args.dtype]
        torch.manual_seed(0)  # same weights on every rank and for both engines
        self.model = Stack(args.blocks, args.dim).to(dtype)
        named = [(n, p, None) for n, p in self.model.named_parameters()]
        units = [
            (f"blocks.{i}", [f"blocks.{i}.{n}" for n, _ in block.named_parameters()])
            for i, block in enumerate(self.model.blocks)
        ]
        overlap = name == "new"
        self.dp_config = DataParallelConfig(
            overlap_grad_reduce=overlap,
            overlap_param_gather=overlap,
            grad_reduce_dtype=args.grad_reduce_dtype,
            param_gather_depth=args.gather_depth,
        )
        self.opt = DistributedOptimizer(
            named,
            CONFIG,
            dp_group=dist.group.WORLD,
            tp_rank=0,
            norm_group=None,
            units=units,
            data_parallel=self.dp_config,
        )
        for (unit, _), block in zip(units, self.model.blocks):
            self.opt.wait_before_forward(unit, [block])
        g = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
        self.inputs = [torch.randn(args.tokens, args.dim, generator=g).to(dtype) for _ in range(args.microbatches)]
        self.step_index = 0
        # comm-only: per unit (forward order) the reduce-scatter's input and output, the all-gather's send and receive.
        grad_dtype = self.dp_config.grad_dtype
        self.comm_buffers = []
        for _, block in zip(units, self.model.blocks):
            n = 0
            for p in block.parameters():
                rows = p.shape[0]
                n += -(-rows // world) * (p.numel() // rows)
            self.comm_buffers.append(
                (
                    torch.randn(world * n).to(grad_dtype),
                    torch.empty(n, dtype=grad_dtype),
                    torch.randn(n).to(dtype),
                    torch.empty(world * n, dtype=dtype),
                )
            )
        self.params = sum(p.numel() for p in self.model.parameters())
        self.marks: dict[str, list[float]] | None = None  # instrumented iterations: forward/backward times

    def iteration(self) -> None:
        """zero_grad, forward + backward of every micro-batch, step (today's: all DP comm inside
        `step`; new: reduce-scatters during the backward, all-gathers until the next forward)."""
        opt, marks = self.opt, self.marks
        opt.zero_grad()
        opt.begin_accumulation(len(self.inputs))
        for x in self.inputs:
            if marks is not None:
                marks["forward_start"].append(time.perf_counter())
            loss = self.model(x).float().square().mean() / len(self.inputs)
            if marks is not None:
                marks["forward_end"].append(time.perf_counter())
                marks["waits_after_forward"].append(list(opt.forward_waits))
                marks["backward_start"].append(time.perf_counter())
            loss.backward()
            if marks is not None:
                marks["backward_end"].append(time.perf_counter())
        if marks is not None:
            marks["step_start"].append(time.perf_counter())
        opt.step(self.step_index)
        if marks is not None:
            marks["step_end"].append(time.perf_counter())
        self.step_index += 1

    def comm_only(self, depth: int) -> None:
        """The step's reduce-scatters then all-gathers, no compute (today's issue pattern)."""
        rs, ag = optimizer_module.reduce_scatter_single, optimizer_module.all_gather_single
        works = [rs(out, inp, op=dist.ReduceOp.SUM, async_op=True) for inp, out, _, _ in reversed(self.comm_buffers)]
        for w in works:
            w.wait()
        pending = []
        for _, _, send, recv in self.comm_buffers:
            if len(pending) == depth:
                pending.pop(0).wait()
            pending.append(ag(recv, send, async_op=True))
        for w in pending:
            w.wait()

    def settle(self) -> None:
        """Complete everything in flight and line the ranks up (between phases)."""
        self.opt.finish_param_sync()
        dist.barrier()


def _timed(fn, warmup: int, iters: int) -> list[float]:
    """Durations of `iters` calls after `warmup`, each from one call's start to the next's."""
    for _ in range(warmup):
        fn()
    marks = [time.perf_counter()]
    for _ in range(iters):
        fn()
        marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks, marks[1:])]


def probe_async(rank: int, world: int) -> dict:
    """Does an ``async_op=True`` reduce-scatter on this backend return before the peers join?
    Rank 0 joins `PROBE_DELAY_S` late; the others time how long the call takes to return."""
    n = 1 << 16
    inp, out = torch.ones(world * n), torch.empty(n)
    optimizer_module.reduce_scatter_single(out, inp, async_op=True).wait()  # connect
    dist.barrier()
    if rank == 0:
        time.sleep(PROBE_DELAY_S)
    t0 = time.perf_counter()
    work = optimizer_module.reduce_scatter_single(out, inp, async_op=True)
    issue_s = time.perf_counter() - t0
    work.wait()
    wait_s = time.perf_counter() - t0
    dist.barrier()
    return {"issue_s": issue_s, "wait_s": wait_s, "async": rank == 0 or issue_s < PROBE_DELAY_S / 2}


def order_evidence(engine: Engine, collectives: Collectives) -> dict:
    """Two instrumented iterations with the collectives recorded: the reduce-scatters of the first
    against its last backward, the all-gathers its step launched against the second's forward."""
    engine.marks = {
        k: []
        for k in (
            "forward_start",
            "forward_end",
            "waits_after_forward",
            "backward_start",
            "backward_end",
            "step_start",
            "step_end",
        )
    }
    log = collectives.use_recording()
    try:
        engine.iteration()
        engine.iteration()
    finally:
        collectives.use_real()
        marks, engine.marks = engine.marks, None
    engine.settle()
    m = len(engine.inputs)
    bwd_start, bwd_end = marks["backward_start"][m - 1], marks["backward_end"][m - 1]
    first_step_end = marks["step_end"][0]
    rs = [e for e in log if e["kind"] == "reduce_scatter" and e["t"] < first_step_end]
    fwd_start, fwd_end = marks["forward_start"][m], marks["forward_end"][m]  # the second iteration's first forward
    ag = [e for e in log if e["kind"] == "all_gather" and marks["step_start"][0] <= e["t"] < fwd_end]
    return {
        "reduce_scatters": len(rs),
        "first_reduce_scatter_before_backward_end": bool(rs) and min(e["t"] for e in rs) < bwd_end,
        "reduce_scatters_during_backward": sum(bwd_start <= e["t"] < bwd_end for e in rs),
        "reduce_scatter_wait_s": sum(e["wait_s"] for e in rs),
        "all_gathers": len(ag),
        "all_gathers_during_step": sum(e["t"] < first_step_end for e in ag),
        "all_gathers_during_next_forward": sum(fwd_start <= e["t"] < fwd_end for e in ag),
        "all_gather_wait_s": sum(e["wait_s"] for e in ag),
        "units_waited_by_forward_hooks": len(marks["waits_after_forward"][m]),
    }


def run_rank(rank: int, world: int, args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    collectives = Collectives()
    probe = probe_async(rank, world)
    engines = {name: Engine(name, args, rank, world) for name in ENGINES}
    samples = {name: {"compute": [], "comm": [], "step": []} for name in ENGINES}
    for engine in engines.values():  # a real iteration fills every buffer the no-ops leave untouched
        engine.iteration()
        engine.settle()
    # Many short rounds, each timing every phase of both engines (their order alternating), so
    # that a change of load on the machine falls on all of them alike.
    for round_index in range(args.rounds):
        for name in ENGINES if round_index % 2 == 0 else ENGINES[::-1]:
            engine = engines[name]
            collectives.use_noop()
            try:
                samples[name]["compute"] += _timed(engine.iteration, args.warmup, args.iters)
                engine.opt.finish_param_sync()
            finally:
                collectives.use_real()
            dist.barrier()
            samples[name]["comm"] += _timed(lambda e=engine: e.comm_only(args.gather_depth), args.warmup, args.iters)
            dist.barrier()
            samples[name]["step"] += _timed(engine.iteration, args.warmup, args.iters)
            engine.settle()
    out = {"probe": probe, "engines": {}}
    for name, engine in engines.items():
        med = {k: statistics.median(v) for k, v in samples[name].items()}
        out["engines"][name] = {**med, "order": order_evidence(engine, collectives), "params": engine.params}
    return out


# ---------------------------------------------------------------------------------------- spawn
def _entry(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=300)
    )
    try:
        result = run_rank(rank, world, args)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    except BaseException:
        Path(out_dir, f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        # The optimizers and models form reference cycles (gradient hooks) and hold the process
        # group; destroyed only at interpreter exit, gloo aborts the process now and then
        # ("terminate called without an active exception"). Free them before the group.
        gc.collect()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, args: argparse.Namespace) -> list[dict]:
    """Spawn `world` gloo ranks; their results in rank order."""
    with tempfile.TemporaryDirectory(prefix="dp_overlap_") as out_dir:
        try:
            mp.start_processes(_entry, args=(world, _free_port(), args, out_dir), nprocs=world, start_method="spawn")
        except Exception as exc:
            detail = "\n".join(p.read_text() for p in sorted(Path(out_dir).glob("*.error")))
            raise RuntimeError(f"dp_overlap: a rank failed: {exc}\n{detail}") from None
        return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def hidden_fraction(compute: float, comm: float, step: float) -> float:
    """Share of the communication time that did not add to the step: (compute + comm - step) / comm in [0, 1]."""
    if comm <= 0:
        return 0.0
    return min(1.0, max(0.0, (compute + comm - step) / comm))


def summarize(world: int, ranks: list[dict], args: argparse.Namespace) -> list[dict]:
    """One record per engine for this world: rank means of the per-rank medians, the fractions."""
    cores = _cores()
    collectives_async = all(r["probe"]["async"] for r in ranks)
    note = []
    if not collectives_async:
        note.append(
            "gloo collectives with async_op=True did not return before their peers joined: "
            "they block, no overlap is possible on this backend (the order below is still the engine's)"
        )
    if cores < 2 * world:  # each rank: a compute thread plus gloo's communication threads
        note.append(
            f"{world} ranks on {cores} cores: gloo's communication threads compete with the compute "
            "threads for the same cores, so hidden communication is paid partly as slower compute; "
            "the hidden fraction understates what the ordering gives where communication has its own "
            "hardware"
        )
    if world > cores:
        note.append(
            "more ranks than cores: in the full step one rank's communication (partly waiting on its "
            "peers) runs while another rank computes, which the phases timed alone do not capture, so "
            "even today's engine can show a hidden fraction: compare the new engine with today's "
            "(saved_vs_today_fraction, step_ratio_to_today), not with 0"
        )
    records = []
    today_step = statistics.fmean(r["engines"]["today"]["step"] for r in ranks)
    for name in ENGINES:
        per = [r["engines"][name] for r in ranks]
        compute = statistics.fmean(p["compute"] for p in per)
        comm = statistics.fmean(p["comm"] for p in per)
        step = statistics.fmean(p["step"] for p in per)
        orders = [p["order"] for p in per]
        order = {
            "first_reduce_scatter_before_backward_end": all(
                o["first_reduce_scatter_before_backward_end"] for o in orders
            ),
            **{
                k: statistics.fmean(o[k] for o in orders) if k.endswith("_wait_s") else min(o[k] for o in orders)
                for k in orders[0]
                if k != "first_reduce_scatter_before_backward_end"
            },
        }
        records.append(
            {
                "engine": name,
                "ranks": world,
                "hidden_fraction": round(hidden_fraction(compute, comm, step), 4),
                "hidden_fraction_per_rank": [
                    round(hidden_fraction(p["compute"], p["comm"], p["step"]), 4) for p in per
                ],
                "step_s": step,
                "compute_s": compute,
                "comm_s": comm,
                "exposed_comm_s": step - compute,
                "step_ratio_to_today": 1.0 if name == "today" else step / today_step,
                "saved_vs_today_fraction": (today_step - step) / comm,
                "collectives_async": collectives_async,
                "async_probe_issue_s": max(r["probe"]["issue_s"] for r in ranks),
                "order": order,
                "microbatches": args.microbatches,
                "blocks": args.blocks,
                "dim": args.dim,
                "tokens": args.tokens,
                "dtype": args.dtype,
                "grad_reduce_dtype": args.grad_reduce_dtype,
                "param_gather_depth": args.gather_depth,
                "params": per[0]["params"],
                "samples_per_phase": args.rounds * args.iters,
                "cores": cores,
                "cores_per_rank": round(cores / world, 3),
                "torch": torch.__version__,
                "note": "; ".join(note),
            }
        )
    return records


def print_table(records: list[dict]) -> None:
    r0 = records[0]
    print(
        f"DP communication overlap: {r0['blocks']} MLP blocks (d={r0['dim']}, {r0['params'] / 1e6:.2f}M params, "
        f"{r0['dtype']}), {r0['tokens']} tokens x {r0['microbatches']} micro-batch(es) per rank, gloo, "
        f"{r0['cores']} cores; medians of {r0['samples_per_phase']} iterations"
    )
    header = (
        f"{'ranks':>5} {'engine':>6} {'compute ms':>10} {'comm ms':>8} {'step ms':>8} {'hidden':>7} "
        f"{'step/today':>10} {'saved':>7}  order: first RS before backward end; RS issued in backward, AG issued in "
        "next forward (of all); ms blocked waiting RS, AG"
    )
    print(header)
    print("-" * len(header))
    notes = {}
    for r in records:
        o = r["order"]
        print(
            f"{r['ranks']:>5} {r['engine']:>6} {r['compute_s'] * 1e3:>10.1f} {r['comm_s'] * 1e3:>8.1f} "
            f"{r['step_s'] * 1e3:>8.1f} {r['hidden_fraction']:>7.1%} {r['step_ratio_to_today']:>10.3f} "
            f"{r['saved_vs_today_fraction']:>7.1%}  "
            f"{'yes' if o['first_reduce_scatter_before_backward_end'] else 'no'}; "
            f"{o['reduce_scatters_during_backward']}/{o['reduce_scatters']}, "
            f"{o['all_gathers_during_next_forward']}/{o['all_gathers']}; "
            f"{o['reduce_scatter_wait_s'] * 1e3:.1f}, {o['all_gather_wait_s'] * 1e3:.1f}"
        )
        if r["note"]:
            notes[r["ranks"]] = r["note"]
    for ranks, text in notes.items():
        print(f"note ({ranks} ranks): {text}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.ranks) < 2:
        raise SystemExit("dp_overlap: --ranks must be >= 2 (DP communication needs two ranks)")
    for flag in ("blocks", "dim", "tokens", "microbatches", "gather_depth", "iters", "rounds", "warmup"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"dp_overlap: --{flag.replace('_', '-')} must be >= 1")
    records = []
    for world in args.ranks:
        records += summarize(world, run_world(world, args), args)
    if args.json:
        for r in records:
            print(json.dumps(r, sort_keys=True), flush=True)
    else:
        print_table(records)
    return 0 if all(math.isfinite(r["step_s"]) for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
