"""``qwenimage plan``: the chosen layout, the runners-up, errors, --json, the storage formula
checked against the bytes of real caches (tiny dims and the real 16 x 3584 dims), the overlap
model of the DP communication and the compute rate of TP shards."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megatron_qwenimage import accounting
from megatron_qwenimage import planner as P
from megatron_qwenimage.cli import main
from megatron_qwenimage.config import load_config

MIX = "256:0.2,640:0.3,1328:0.5"
ARGS = ["plan", "--gpus", "64", "--gpu", "h200", "--resolution-mix", MIX, "--images", "1e9"]


@pytest.fixture(scope="module")
def plan64() -> P.Plan:
    return P.make_plan(P.PlanInputs(gpus=64, gpu="h200", mix=P.parse_mix(MIX), images=10**9))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------ the choice
def test_chosen_layout_fits_and_beats_every_other_layout(plan64):
    chosen, inputs = plan64.chosen, plan64.inputs
    lay = chosen.layout
    assert lay.tp * lay.pp * lay.dp == 64
    assert chosen.fits and chosen.memory_gib <= inputs.budget_gib == pytest.approx(0.9 * P.GPUS["h200"].hbm_gib)
    # The criterion, against every candidate (not only the listed runners-up): nothing that fits
    # is predicted faster.
    every = list(P.iter_layout_plans(inputs))
    assert len(every) == plan64.considered > 10
    assert any(not p.fits for p in every)  # the budget bites: some layouts are refused
    for p in every:
        if p.fits:
            assert p.images_per_s <= chosen.images_per_s * (1 + 1e-9), p.layout
    # Each runner-up says why it lost, with numbers that hold.
    assert plan64.runners_up
    for r in plan64.runners_up:
        if r.plan.fits:
            assert r.why.startswith("slower:") and r.plan.images_per_s <= chosen.images_per_s
            assert f"{r.plan.images_per_s:.1f} img/s" in r.why
        else:
            assert r.why.startswith("doesn't fit:") and r.plan.memory_gib > inputs.budget_gib
            assert f"> budget {inputs.budget_gib:.1f} GiB" in r.why
    # The memory reported is the accounting's, for the chosen micro-batches.
    worst = chosen.worst_bucket
    mem = P.predicted_memory(
        load_config("qwen-image-20b"), lay, worst.resolution, worst.micro_batch, worst.microbatches, 256
    )
    assert worst.memory_gib == pytest.approx(mem["total"] / accounting.GIB)


def test_reserve_flag_moves_the_budget_and_the_choice(capsys):
    tight = ["plan", "--gpus", "64", "--gpu", "h200", "--resolution-mix", MIX, "--json", "--reserve"]
    rc, out, _ = run_cli(capsys, *tight, "0.1")
    loose = json.loads(out)
    rc2, out2, _ = run_cli(capsys, *tight, "0.5")
    assert rc == rc2 == 0
    strict = json.loads(out2)
    assert strict["budget_gib"] == pytest.approx(0.5 * strict["hbm_gib"])
    assert strict["memory_gib"] <= strict["budget_gib"] < loose["memory_gib"]
    assert (strict["tp"], strict["pp"], strict["recompute"], strict["micro_batch"]) != (
        loose["tp"],
        loose["pp"],
        loose["recompute"],
        loose["micro_batch"],
    )


def test_no_layout_fits_is_one_line_error_naming_why(capsys):
    rc, out, err = run_cli(capsys, "plan", "--gpus", "2", "--gpu", "h100", "--resolution-mix", "1328:1")
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("qwenimage plan: error: --gpus 2 --gpu h100: no layout fits")
    smallest = min(
        P.iter_layout_plans(P.PlanInputs(gpus=2, gpu="h100", mix=((1328, 1.0),))), key=lambda p: p.memory_gib
    )
    assert f"smallest predicted peak is {smallest.memory_gib:.1f} GiB" in line
    assert f"> budget {0.9 * 79.2:.1f} GiB" in line


@pytest.mark.parametrize("gpus", [P.MAX_GPUS + 1, 10**12])
def test_more_gpus_than_the_documented_bound_is_one_line(capsys, gpus):
    """`--gpus` has an upper bound (`MAX_GPUS`, 2**20, docs/launch.md): a larger count is a typo, not
    a cluster to plan for ("no layout fits ... add GPUs" would be nonsense advice)."""
    rc, out, err = run_cli(capsys, "plan", "--gpus", str(gpus), "--resolution-mix", "256:1")
    assert rc == 2 and out == ""
    assert err == (
        f"qwenimage plan: error: --gpus {gpus}: expected at most 1,048,576 GPUs (2**20, more than any cluster; "
        "the planner's network and batch model mean nothing beyond)\n"
    )
    P.check_inputs(P.PlanInputs(gpus=P.MAX_GPUS, gpu="h200", mix=((256, 1.0),)))  # the bound itself is accepted


def test_json_has_the_plan_keys(capsys):
    rc, out, err = run_cli(capsys, *ARGS, "--json")
    assert rc == 0, err
    d = json.loads(out)
    for key in ("tp", "pp", "dp", "micro_batch", "recompute", "memory_gib", "images_per_s", "producer_gpus"):
        assert key in d, key
    assert d["tp"] * d["pp"] * d["dp"] == 64
    assert set(d["micro_batch"]) == {"256", "640", "1328"} and all(v >= 1 for v in d["micro_batch"].values())
    assert d["recompute"] in ("none", "selective", "full")
    assert 0 < d["memory_gib"] <= d["budget_gib"]
    assert d["images_per_s"] > 0 and d["producer_gpus"] >= 1
    assert d["runners_up"] and {"tp", "pp", "dp", "memory_gib", "images_per_s", "why"} <= set(d["runners_up"][0])
    st = d["storage"]
    assert st["cache_bytes"] == pytest.approx(1e9 * st["mean_bytes_per_sample"])
    assert st["read_gb_s"] == pytest.approx(d["images_per_s"] * st["mean_bytes_per_sample"] / 1e9)
    # Producers: enough GPUs for the consumers' rate at the measured encoder rates.
    pr = d["producers"]
    assert pr["gpus"] == math.ceil(d["images_per_s"] / pr["images_per_s_per_gpu"])
    assert d["rates"]["source"].startswith("measured on NVIDIA H200")


def test_human_output_states_choice_reserve_and_runners_up(capsys):
    rc, out, _ = run_cli(capsys, *ARGS)
    assert rc == 0
    assert "chosen: tp=" in out and "runners-up:" in out
    assert "less --reserve 0.1" in out and "10% reserved" in out
    assert "slower:" in out and "doesn't fit: predicted" in out
    assert "producers:" in out and "cache for 1e+09 images" in out


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--resolution-mix", "256:0.5,1328:0.4"], "--resolution-mix"),  # sums to 0.9
        (["--resolution-mix", "250:1"], "--resolution-mix"),  # not a multiple of 16
        (["--resolution-mix", "1328"], "--resolution-mix"),
        (["--gpu", "a100"], "--gpu"),
        (["--gpus", "0"], "--gpus"),
        (["--gpus", "-8"], "--gpus"),
        (["--gpus", "8.5"], "--gpus"),
        (["--images", "0"], "--images"),
        (["--micro-batch", "0"], "--micro-batch"),
        (["--micro-batch", "1328:2"], "--micro-batch"),  # no value for 256
        (["--global-batch", "-4"], "--global-batch"),
        (["--text-tokens", "0"], "--text-tokens"),
        (["--reserve", "1.5"], "--reserve"),
        (["--hbm-gib", "-1"], "--hbm-gib"),
        (["--precision", "fp4"], "--precision"),
        (["--recompute", "some"], "--recompute"),
    ],
)
def test_bad_flags_are_one_line_errors_naming_the_flag(capsys, argv, flag):
    base = {"--gpus": "64", "--gpu": "h200", "--resolution-mix": "256:0.5,1328:0.5"}
    for k, v in zip(argv[::2], argv[1::2]):
        base[k] = v
    args = ["plan"] + [x for kv in base.items() for x in kv]
    rc, out, err = run_cli(capsys, *args)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qwenimage plan: error: {flag} "), lines


# ------------------------------------------------------------------------------ rates
def test_step_time_reproduces_the_measured_training_loop():
    """The planner's step time for the benchmarked 4-block slice (1 GPU, 1024 px, micro-batch 2)
    against the real loop's measured step (megatron_qwenimage/gpu_results/2026-11-30-h200-train-loop-b:
    bf16 92.9 ms, FP8 without fused kernels 88.4 ms): within 10 %. And its memory against the
    measured peak of the same slice with the training optimizer (32.23 GiB, FP8): within 15 %."""
    records = [r for _, _, r in P.read_records(P.DEFAULT_RESULTS_DIR) if r.get("what") == "train_loop"]
    loop = {r["precision"]: r["step_time_s_steady"] for r in records if r.get("step_time_s_steady")}
    cfg = load_config("qwen-image-20b", num_layers=4)
    lay = P.Layout(1, 1, 1, "none", False)
    for precision, measured in (("bf16", loop["bf16"]), ("fp8", loop["fp8:nofused"])):
        rates = P.step_rates("h200", precision)
        t = P.step_time(cfg, lay, 1024, 2, 1, 256, rates, P.GPUS["h200"])["total"]
        assert t == pytest.approx(measured, rel=0.10), (precision, t, measured)
    peak = [
        r["peak_mem_gib"]
        for _, _, r in P.read_records(P.DEFAULT_RESULTS_DIR)
        if r.get("what") == "optimizer" and r.get("peak_mem_gib")
    ]
    mem = P.predicted_memory(cfg, lay, 1024, 2, 1, 256, "fp8")["total"] / accounting.GIB
    assert mem == pytest.approx(peak[0], rel=0.15)


def test_unmeasured_gpus_are_scaled_from_the_h200_and_say_so(tmp_path):
    h200 = P.step_rates("h200", "bf16")
    b200 = P.step_rates("b200", "bf16")
    assert b200.scale == pytest.approx(2250 / 989)
    assert b200.rate(1e13) == pytest.approx(h200.rate(1e13) * 2250 / 989)
    assert any("scaled by the peak bf16 TFLOP/s ratio" in n for n in b200.notes)
    d = P.make_plan(P.PlanInputs(gpus=64, gpu="b200", mix=P.parse_mix(MIX))).to_dict()
    assert any("H200 rates scaled" in n for n in d["notes"])
    assert any("producer rates: H200 measurements scaled" in n for n in d["notes"])
    # No records at all: the built-in H200 anchors (docs/launch.md), and the output says so.
    anchors = P.step_rates("h200", "bf16", tmp_path)
    assert anchors.source.startswith("H200 anchors of docs/launch.md")
    assert [p.tflops for p in anchors.points] == pytest.approx([p.tflops for p in h200.points], rel=1e-3)


def test_rates_come_from_the_records(tmp_path):
    """A record file for the GPU is parsed: a faster record gives a faster plan."""
    src = P.DEFAULT_RESULTS_DIR / "2026-11-29-h200-run.jsonl"
    fast = []
    for line in src.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("fwd_bwd_ms"):
            rec["fwd_bwd_ms"] /= 2
        fast.append(json.dumps(rec))
    (tmp_path / "fast.jsonl").write_text("\n".join(fast))
    base = P.step_rates("h200", "bf16")
    doubled = P.step_rates("h200", "bf16", tmp_path)
    pt = [p for p in doubled.points if p.resolution == 1024][0]
    ref = [p for p in base.points if p.resolution == 1024][0]
    assert pt.tflops == pytest.approx(2 * ref.tflops, rel=0.01)


# ------------------------------------------------------------------------------ storage
def _payload(bucket, n: int, lengths: list[int], text_dim: int, prefix: str, seed: int):
    from megatron_qwenimage.cache import SampleMeta, ShardTensors
    from megatron_qwenimage.cache.shard_format import offsets_from_lengths
    from megatron_qwenimage.cache.writer import ShardPayload

    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(n, 16, bucket.latent_height, bucket.latent_width, generator=g).to(torch.bfloat16)
    text = torch.randn(sum(lengths), text_dim, generator=g).to(torch.bfloat16)
    samples = [
        SampleMeta(f"{prefix}-{i:04d}", "t2i", f"caption {prefix} {i}", f"file:///data/{prefix}/{i:04d}.png", None,
                   lengths[i], False, 512, 512)
        for i in range(n)
    ]  # fmt: skip
    return ShardPayload(bucket, ShardTensors(lat, text, offsets_from_lengths(lengths)), samples)


def _shard_sizes(cache_path: str) -> list[tuple]:
    """Per committed shard: (bucket, samples, text rows, text dim, file -> bytes), after checking
    the commit record's byte counts against the files on disk."""
    from megatron_qwenimage.cache import open_cache

    out = []
    cache = open_cache(cache_path)
    for shard in cache.snapshot().shards:
        e = shard.entry
        files = {name: fc.bytes for name, fc in e.files.items()}
        for name, nbytes in files.items():
            assert os.path.getsize(Path(cache_path, e.path, name)) == nbytes
        text_rows = int(shard.samples.column("text_len").to_numpy().sum())
        out.append((e.bucket, e.num_samples, text_rows, e.text_dim, files))
    return out


def _verify_json(capsys, path: str) -> dict:
    rc, out, err = run_cli(capsys, "cache", "verify", path, "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["ok"], report
    return report


def test_storage_formula_matches_a_tiny_cache(tmp_path, capsys):
    """A committed cache with the real 16 latent channels and a 32-wide text embedding: per shard
    the tensor files equal the formula to the byte (zarr stores them uncompressed), the whole
    shard (parquet metadata included) within 5 %; bytes per sample per bucket likewise."""
    from megatron_qwenimage.cache import Bucket
    from tests.helpers.reader import publish

    buckets = {Bucket(64, 64): 12, Bucket(128, 96): 10}
    g = torch.Generator().manual_seed(3)
    for p in range(2):
        payloads = []
        for i, (b, n) in enumerate(sorted(buckets.items())):
            lengths = [int(x) for x in torch.randint(24, 72, (n,), generator=g)]
            payloads.append(_payload(b, n, lengths, 32, f"p{p}{b.name}", 10 * p + i))
        publish(tmp_path, f"p{p}", payloads, snapshot=False)
    from megatron_qwenimage.cache import open_cache

    open_cache(str(tmp_path)).create_snapshot()
    report = _verify_json(capsys, str(tmp_path))
    assert report["buckets"] == {b.name: 2 * n for b, n in buckets.items()}

    # The planner's metadata allowance for these rows: their strings uncompressed (P.metadata_bytes).
    meta = P.metadata_bytes(len("caption p0128x96 11"), len("file:///data/p0128x96/0011.png"), len("p0128x96-0011"))
    per_bucket: dict[str, list[float]] = {}
    for bucket, n, rows, dim, files in _shard_sizes(str(tmp_path)):
        assert dim == 32
        tensors = sum(v for k, v in files.items() if k.startswith("tensors.zarr/") and not k.endswith("zarr.json"))
        # Everything but the zarr.json files and samples.parquet (the formula's SHARD_FIXED_BYTES
        # and metadata allowance): to the byte.
        predicted_tensors = P.shard_bytes(n, (bucket.height_px, bucket.width_px), rows, text_dim=32, metadata=0)
        assert tensors == predicted_tensors - P.SHARD_FIXED_BYTES, (bucket, files)
        total = sum(files.values())
        predicted = P.shard_bytes(n, (bucket.height_px, bucket.width_px), rows, text_dim=32, metadata=meta)
        assert predicted == pytest.approx(total, rel=0.05), (bucket, total, predicted)
        assert files["samples.parquet"] <= P.SHARD_FIXED_BYTES + n * meta  # an upper bound per row
        per_bucket.setdefault(bucket.name, []).append(total / n)
        per_bucket[bucket.name + "_rows"] = per_bucket.get(bucket.name + "_rows", []) + [rows / n]
    for b, n in buckets.items():
        measured = sum(per_bucket[b.name]) / len(per_bucket[b.name])
        mean_rows = sum(per_bucket[b.name + "_rows"]) / len(per_bucket[b.name + "_rows"])
        per_sample = P.sample_bytes((b.height_px, b.width_px), mean_rows, text_dim=32, metadata=meta)["total"]
        fixed = (P.SHARD_FIXED_BYTES + P.text_padding_bytes(32)) / n
        assert per_sample + fixed == pytest.approx(measured, rel=0.05), b


def test_storage_formula_at_real_dims(tmp_path, capsys):
    """The real layout: 16 latent channels, 3584-wide text embeddings; then the planner's
    per-sample bytes at 1328 px and 256 tokens by hand."""
    from megatron_qwenimage.cache import Bucket, open_cache
    from tests.helpers.reader import publish

    b = Bucket(256, 256)
    publish(tmp_path, "p0", [_payload(b, 4, [64, 80, 48, 64], 3584, "real", 1)])
    assert _verify_json(capsys, str(tmp_path))["buckets"] == {"256x256": 4}
    ((bucket, n, rows, dim, files),) = _shard_sizes(str(tmp_path))
    assert dim == 3584 and rows == 256
    total = sum(files.values())
    predicted = P.shard_bytes(n, 256, rows, metadata=P.metadata_bytes(len("caption real 0"), 30))
    assert predicted == pytest.approx(total, rel=0.01)
    assert open_cache(str(tmp_path)).snapshot().shards[0].entry.latent_channels == 16
    # Scaled to the run: a 1328 px sample with 256 caption tokens.
    s = P.sample_bytes(1328, 256)
    assert s["latents"] == 16 * 166 * 166 * 2 + 16
    assert s["text_embeddings"] == 256 * 3584 * 2 + 16
    assert s["total"] == pytest.approx(881_792 + 16 + 1_835_008 + 16 + 8 + P.DEFAULT_METADATA_BYTES)
    assert s["text_embeddings"] > 2 * s["latents"]  # the text embeddings dominate


# ------------------------------------------------------------------------------ DP overlap
CFG20B = load_config("qwen-image-20b")


def test_dp_buckets_are_the_stage_parameters_per_block():
    """One bucket per block of the largest stage, the embedders and the head folded into its first
    and last: together exactly the parameters the optimizer reduces (the accounting's)."""
    for tp, pp in ((1, 1), (8, 1), (4, 2), (1, 4), (2, 3)):
        buckets = P.dp_bucket_params(CFG20B, tp, pp)
        assert len(buckets) == CFG20B.num_layers // pp
        assert sum(buckets) == P.largest_stage_params(CFG20B, tp, pp), (tp, pp)
    whole = P.dp_bucket_params(CFG20B, 1, 1)
    block = accounting.parameter_counts(CFG20B).block_total
    assert whole[1] == block and whole[0] > block > whole[-1]  # embedders in; the last block's unused text out


def test_overlap_with_compute_far_above_comm_exposes_only_the_ends():
    """One micro-batch, a block's compute 100x its bucket's communication: the reduce-scatter of
    block 0 (launched when the backward ends) and the all-gather of block 0 (waited before the
    first forward) are all that shows; every other bucket hides behind a block's compute."""
    buckets = [3_000_000] + [1_000_000] * 18 + [2_000_000]
    bw = 10.0  # GB/s
    o = P.dp_overlap(buckets, 64, bw, forward_s=1.0, backward_s=2.0)
    per_param = 63 / 64 / (bw * 1e9)
    assert o.reduce_s == pytest.approx(sum(buckets) * 4 * per_param)
    assert o.gather_s == pytest.approx(sum(buckets) * 2 * per_param)
    assert o.reduce_exposed_s == pytest.approx(buckets[0] * 4 * per_param)
    assert o.gather_exposed_s == pytest.approx(buckets[0] * 2 * per_param)
    assert o.exposed_s == pytest.approx(o.comm_s * 3 / 23)


def test_overlap_with_comm_far_above_compute_exposes_comm_less_compute():
    """Each bucket's communication 100x a block's compute: the channel never idles after the
    first bucket, so what shows is the communication less the compute it overlaps (all blocks but
    one: the reduce-scatters start after the first block's backward, and the last forward runs
    after the last gather)."""
    reduce = [1.0, 2.0, 1.5, 3.0]
    gather = [0.5, 1.0, 0.75, 1.5]
    fwd, bwd = 0.01, 0.02
    n = len(reduce)
    assert P.reduce_scatter_exposed(reduce, bwd) == pytest.approx(sum(reduce) - (n - 1) * bwd)
    assert P.all_gather_exposed(gather, fwd) == pytest.approx(sum(gather) - (n - 1) * fwd)
    # Depth 1: bucket k + 1 is launched only when block k starts, the channel still never idles here.
    assert P.all_gather_exposed(gather, fwd, depth=1) == pytest.approx(sum(gather) - (n - 1) * fwd)


def test_all_gather_prefetch_depth_lets_a_large_bucket_start_early():
    """Buckets of 1, 1, 3, 1 s against 1.5 s forwards. Depth 2: bucket 2's gather is launched when
    block 0 starts (t = 1), runs 2..5, block 2 waits 1 s; block 0 waited 1 s for the first: 2 s.
    Depth 1: it is launched only when block 1 starts (t = 2.5), block 2 waits 1.5 s: 2.5 s."""
    gather = [1.0, 1.0, 3.0, 1.0]
    assert P.all_gather_exposed(gather, 1.5, depth=2) == pytest.approx(2.0)
    assert P.all_gather_exposed(gather, 1.5, depth=1) == pytest.approx(2.5)
    assert P.all_gather_exposed(gather, 1.5, depth=4) == pytest.approx(2.0)  # the channel is the limit


def _step(layout, microbatches=1, spec=P.GPUS["h100"], **kwargs):
    rates = P.step_rates("h100", "bf16")
    return P.step_time(CFG20B, layout, 1024, 4, microbatches, 256, rates, spec, **kwargs)


TP8_DP256 = P.Layout(8, 1, 256, "none", True)


def test_more_micro_batches_do_not_hide_more_dp_communication():
    """Only the last micro-batch's backward and the first one's forward overlap DP communication:
    four micro-batches quadruple the compute but leave the exposed seconds as they were. At 5 GB/s
    between nodes a bucket takes longer than its block, so more overlapped compute would show."""
    slow = replace(P.GPUS["h100"], inter_node_gb_s=5.0)
    one, four = _step(TP8_DP256, 1, slow), _step(TP8_DP256, 4, slow)
    assert four["compute"] == pytest.approx(4 * one["compute"])
    assert four["dp_comm"] == pytest.approx(one["dp_comm"])
    assert four["dp_exposed"] == pytest.approx(one["dp_exposed"])
    assert one["compute"] < one["dp_exposed"] < one["dp_comm"]


def test_step_total_counts_the_exposed_dp_time_not_the_busy_time():
    t = _step(TP8_DP256)
    assert t["dp_exposed"] == pytest.approx(t["dp_reduce_exposed"] + t["dp_gather_exposed"])
    assert t["total"] == pytest.approx(t["compute"] + t["tp_comm"] + t["pp_comm"] + t["dp_exposed"] + t["optimizer"])
    assert t["dp_exposed"] < 0.1 * t["dp_comm"]  # 2,048 H100: most of it hides behind the blocks


def test_dp_comm_is_the_stage_bytes_and_bf16_gradients_halve_the_reduce():
    """dp_comm is still the stage's fp32 reduce-scatter and bf16 all-gather (6 bytes per parameter)
    over DP; bf16 gradients send 4 bytes per parameter, and expose no more."""
    stage = P.largest_stage_params(CFG20B, 8, 1)
    fp32 = _step(TP8_DP256)
    assert fp32["dp_comm"] == pytest.approx(stage * 6 * 255 / 256 / 45e9)
    bf16 = _step(TP8_DP256, grad_reduce_bytes=2)
    assert bf16["dp_comm"] == pytest.approx(stage * 4 * 255 / 256 / 45e9)
    assert bf16["dp_exposed"] <= fp32["dp_exposed"] and bf16["total"] <= fp32["total"]


def test_no_dp_no_dp_communication():
    t = _step(P.Layout(8, 1, 1, "none", True))
    assert t["dp_comm"] == t["dp_exposed"] == 0.0
    assert P.dp_overlap([10**9] * 4, 1, 45.0, 1.0, 2.0) == P.DPOverlap(0.0, 0.0, 0.0, 0.0)


def test_exposed_dp_time_is_monotone_in_bandwidth_and_compute():
    """Less bandwidth exposes more, more compute per block hides more; exposed never exceeds busy."""
    buckets = P.dp_bucket_params(CFG20B, 8, 1)
    last = None
    for bw in (400.0, 100.0, 45.0, 12.0, 3.0):
        o = P.dp_overlap(buckets, 256, bw, 0.002, 0.004)
        assert 0 <= o.exposed_s <= o.comm_s
        if last is not None:
            assert o.exposed_s >= last - 1e-12
        last = o.exposed_s
    last = None
    for fwd in (0.0, 0.001, 0.002, 0.004, 0.01):
        o = P.dp_overlap(buckets, 256, 45.0, fwd, 2 * fwd)
        if last is not None:
            assert o.exposed_s <= last + 1e-12
        last = o.exposed_s
    # Under PP each stage overlaps its own blocks only: the same DP group, fewer blocks to hide behind.
    assert _step(P.Layout(8, 2, 128, "none", True), 2)["dp_exposed"] > 0


def test_grad_reduce_dtype_flag_reaches_the_plan(capsys):
    argv = ["plan", "--gpus", "2048", "--gpu", "h100", "--resolution-mix", "1024:1", "--json"]
    rc, out, _ = run_cli(capsys, *argv)
    rc2, out2, _ = run_cli(capsys, *argv, "--grad-reduce-dtype", "bfloat16")
    assert rc == rc2 == 0
    fp32, bf16 = json.loads(out), json.loads(out2)
    assert fp32["grad_reduce_dtype"] == "float32" and bf16["grad_reduce_dtype"] == "bfloat16"
    assert bf16["dp_comm_s"] == pytest.approx(fp32["dp_comm_s"] * 4 / 6)
    # The gradient buffer halves too (the chosen layout's prediction, same micro-batches).
    grads = [p["buckets"][0]["memory_parts_gib"]["grads"] for p in (fp32, bf16)]
    assert grads[1] == pytest.approx(grads[0] / 2), grads
    assert fp32["dp_comm_s"] == pytest.approx(fp32["buckets"][0]["step_parts_s"]["dp_comm"])
    note = next(n for n in fp32["notes"] if n.startswith("DP communication"))
    assert f"{fp32['dp_comm_s']:.3f} s per step, {fp32['dp_exposed_s']:.3f} s exposed" in note
    assert "modelled overlap" in note and "not overlapped" not in note
    assert any("TP at 360 GB/s inside a node (not overlapped)" in n for n in fp32["notes"])
    rc, out, err = run_cli(capsys, *argv, "--grad-reduce-dtype", "fp16")
    assert rc == 2 and err.startswith("qwenimage plan: error: --grad-reduce-dtype 'fp16': expected one of")


# ------------------------------------------------------------------------------ TP shard rates
def _per_gpu_block_flops(tp: int, micro_batch: int = 4, resolution: int = 1024) -> float:
    n = (resolution // 16) ** 2
    return accounting.model_flops_per_sample(CFG20B, n, 256) * micro_batch / (tp * CFG20B.num_layers)


def _shard_efficiency(tp: int, gpu: str = "h100", micro_batch: int = 4) -> float:
    ridge = P.ridge_point(P.GPUS[gpu], "bf16")
    return P.tp_shard_efficiency(CFG20B, tp, 4096, 256, micro_batch, ridge)


def test_a_tp8_shard_is_faster_than_the_whole_block_and_near_its_tflops():
    """A TP8 shard of a 1024 px micro-batch of 4 keeps M = 17k tokens in every GEMM: it is
    predicted ~8x faster per micro-batch than the whole block, at a model TFLOP/s close to the
    whole block's at the same tokens x micro-batch (not the launch-bound ~1/8 of it)."""
    rates = P.step_rates("h100", "bf16")
    shard, whole = _per_gpu_block_flops(8), _per_gpu_block_flops(1)
    shard_rate = rates.rate(shard, 8, _shard_efficiency(8))
    whole_rate = rates.rate(whole)
    assert shard / shard_rate < whole / whole_rate / 6  # per micro-batch
    assert 0.8 * whole_rate < shard_rate < whole_rate
    # The efficiency: 1 unsharded, falling with TP as the GEMMs narrow, and less on the card with
    # less HBM bandwidth per FLOP (H100 3.35 TB/s against the H200's 4.8 at the same peak).
    effs = [_shard_efficiency(tp) for tp in (1, 2, 4, 8)]
    assert effs[0] == 1.0 and effs == sorted(effs, reverse=True) and effs[-1] > 0.8
    assert _shard_efficiency(8, "h200") > _shard_efficiency(8, "h100")


def test_the_2048_h100_plan_computes_at_most_of_the_whole_block_rate():
    d = P.make_plan(P.PlanInputs(gpus=2048, gpu="h100", mix=((1024, 1.0),))).to_dict()
    b = d["buckets"][0]
    flops = accounting.model_flops_per_sample(CFG20B, 4096, 256) * b["micro_batch"] * b["microbatches"]
    compute_tflops = flops / (d["tp"] * d["pp"]) / b["step_parts_s"]["compute"] / 1e12
    assert compute_tflops > 300  # not the ~104 of a launch-bound shard
    assert d["model_tflops_per_gpu"] == pytest.approx(flops / (d["tp"] * d["pp"]) / b["step_s"] / 1e12)
    assert d["mfu"] == pytest.approx(d["model_tflops_per_gpu"] / 989)
    if d["tp"] > 1:
        assert any(n.startswith(f"compute at tp={d['tp']}: no TP{d['tp']}-shard record") for n in d["notes"])


def _with_tp8_record(tmp_path, fwd_bwd_ms: float) -> Path:
    """The H200 records plus one of benchmarks/gpu/run.py --tp-shard 8 (1024 px, micro-batch 4)."""
    src = P.DEFAULT_RESULTS_DIR / "2026-11-29-h200-run.jsonl"
    lines = src.read_text().splitlines()
    shard = {"what": "step", "variant": "ours_te_bf16_fused_tp8", "shape": "1024px_b4_t256_tp8", "res": 1024,
             "batch": 4, "text_tokens": 256, "padded_text": 0, "tp": 8, "step_ms": fwd_bwd_ms + 3.0,
             "fwd_bwd_ms": fwd_bwd_ms}  # fmt: skip
    (tmp_path / "run.jsonl").write_text("\n".join([*lines, json.dumps(shard)]) + "\n")
    return tmp_path


def test_a_measured_tp_record_wins_over_the_model(tmp_path):
    """A TP8-shard record (1/8 of the slice's model FLOPs in fwd_bwd_ms) sets the TP8 rate,
    whatever the modelled efficiency; other TP sizes and the whole block keep theirs."""
    slice_cfg = load_config("qwen-image-20b", num_layers=4)
    per_gpu = accounting.model_flops_per_sample(slice_cfg, 4096, 256) * 4 / 8  # the record's slice, one rank
    rates = P.step_rates("h200", "bf16", _with_tp8_record(tmp_path, 20.0))
    (pt,) = [p for p in rates.points if p.tp == 8]
    assert pt.tflops == pytest.approx(per_gpu / 20e-3 / 1e12)
    assert pt.block_flops == pytest.approx(per_gpu / 4)
    for efficiency in (1.0, 0.5):
        assert rates.rate(pt.block_flops, 8, efficiency) == pytest.approx(pt.tflops * 1e12)
    base = P.step_rates("h200", "bf16")
    assert rates.rate(1e13) == pytest.approx(base.rate(1e13))
    assert rates.rate(1e12, 4, 0.9) == pytest.approx(base.rate(1e12, 4, 0.9))
    assert rates.measured_tps() == (8,) and base.measured_tps() == ()
    # It reaches the plan: a slow TP8 record makes the 2,048-GPU plan slower at tp=8, and says so.
    inputs = P.PlanInputs(gpus=2048, gpu="h200", mix=((1024, 1.0),), recompute=("none",), micro_batch={1024: 4})
    slow = P.step_rates("h200", "bf16", _with_tp8_record(tmp_path, 200.0))
    tp8 = P.Layout(8, 1, 256, "none", True)
    plan_slow = P.best_layout_plan(CFG20B, tp8, inputs, slow)
    plan_model = P.best_layout_plan(CFG20B, tp8, inputs, base)
    assert plan_slow.images_per_s < plan_model.images_per_s
    d = P.make_plan(replace(inputs, results_dir=str(_with_tp8_record(tmp_path, 20.0)))).to_dict()
    assert [p["tp"] for p in d["rates"]["points"]].count(8) == 1
    if d["tp"] == 8:
        assert any(n.startswith("compute at tp=8: the rates measured on a TP8 shard") for n in d["notes"])


def test_benchmark_tp_shard_has_a_tp_ranks_local_shapes():
    """benchmarks/gpu/run.py --tp-shard: every block of the slice holds one TP rank's shard of each
    sharded weight (the accounting's per-rank shapes), the modulation linears whole (their output
    is gathered on every rank), and it runs fwd + bwd with no process group."""
    import importlib.util
    import sys

    name = "gpu_bench_run"
    if name not in sys.modules:
        root = Path(__file__).resolve().parents[2]
        spec = importlib.util.spec_from_file_location(name, root / "benchmarks" / "gpu" / "run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    run = sys.modules[name]
    cfg = load_config("tiny")
    model = run.build_tp_shard(cfg, 2, "local", torch.device("cpu"), "float32", fused=False)
    block = model.blocks["0"]
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    assert block.num_local_heads == cfg.num_attention_heads // 2
    assert tuple(block.img_qkv.weight.shape) == (3 * d // 2, d) and tuple(block.txt_out.weight.shape) == (d, d // 2)
    assert tuple(block.img_mlp.fc1.weight.shape) == (f // 2, d) and tuple(block.img_mlp.fc2.weight.shape) == (d, f // 2)
    assert tuple(block.img_mod.weight.shape) == (6 * d, d)
    sharded = sum(t.numel_per_rank(2) for t in accounting.block_tensors(cfg) if "_mod" not in t.name)
    mods = sum(t.numel for t in accounting.block_tensors(cfg) if "_mod" in t.name)
    assert sum(p.numel() for p in block.parameters()) == sharded + mods
    shape = run.Shape(64, 2, 16, tp=2)
    assert shape.label() == "64px_b2_t16_tp2"
    assert run.flops_per_step(cfg, shape) == pytest.approx(run.flops_per_step(cfg, run.Shape(64, 2, 16)) / 2)
    batch = run.make_batch(cfg, shape, torch.device("cpu"), torch.float32)
    loss = run.StepRunner(model, batch, returns_sample=False, optimizer=None).forward_backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in block.parameters())
