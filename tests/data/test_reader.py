"""The training-data reader: global order, DP slicing, resume, tailing, task/cache mixing, curriculum."""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter

import pytest
import torch

from megatron_qwenimage.cache import CacheError, open_cache
from megatron_qwenimage.config import ConfigError
from megatron_qwenimage.data.mixing import CacheCatalog, Planner
from megatron_qwenimage.data.reader import (
    CacheReader,
    ReaderConfig,
    ReaderError,
    ShardChecksumError,
    TailTimeoutError,
    ValidationConfig,
    ValidationReader,
)
from tests.helpers.reader import B16, B32, CHANNELS, TEXT_DIM, make_cache, payload, publish

STAGE = {"name": "s", "buckets": ["16x16", "32x32"], "micro_batch": 2, "global_batch": 4}


def config(*caches, stages=(STAGE,), **kw) -> ReaderConfig:
    return ReaderConfig.from_dict({"caches": list(caches), "stages": list(stages), **kw})


def take(reader: CacheReader, n: int) -> list[list]:
    return [reader.next_global_step() for _ in range(n)]


def ids(steps) -> list[list[str]]:
    """Per step, the sample ids of all micro-batches concatenated."""
    return [[s for mb in step for s in mb.sample_ids] for step in steps]


@pytest.fixture(scope="module")
def mixed_cache(tmp_path_factory):
    """3 partitions x (16x16: 8, 32x32: 8) samples, the last 2 per shard edit samples."""
    return make_cache(tmp_path_factory.mktemp("mixed") / "c", partitions=3, edit=2)


@pytest.fixture(scope="module")
def second_cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("second") / "c2", partitions=2, tag="B")


# ------------------------------------------------------------------ config validation
@pytest.mark.parametrize(
    "change, match",
    [
        ({"stages": [{**STAGE, "buckets": ["17x16"]}]}, r"data.stages\[0\].buckets\[0\]='17x16'.*multiple of 16"),
        ({"stages": [{**STAGE, "buckets": ["big"]}]}, r"data.stages\[0\].buckets\[0\]='big'"),
        (
            {"stages": [{**STAGE, "global_batch": 5}]},
            r"data.stages\[0\].global_batch=5 is not divisible by micro_batch=2",
        ),
        ({"stages": [{**STAGE, "micro_batch": 0}]}, r"data.stages\[0\].micro_batch=0"),
        ({"stages": [{**STAGE, "steps": None}, STAGE]}, r"data.stages\[0\].steps: only the last stage"),
        ({"stages": [{**STAGE, "bogus": 1}]}, r"data.stages\[0\]: unknown key\(s\) \['bogus'\]"),
        ({"caches": [{"path": "/x", "weight": 0}]}, r"data.caches\[0\].weight=0: expected a positive"),
        ({"caches": [{"path": "/x", "weight": -1.0}]}, r"data.caches\[0\].weight=-1.0"),
        ({"caches": [{"path": "/x", "mode": "stream"}]}, r"data.caches\[0\].mode='stream'"),
        ({"caches": [{"path": "/a/x"}, {"path": "/b/x"}]}, r"name\(s\) \['x'\] used twice"),
        ({"tasks": {"t2i": 1.0, "edit": 0.0}}, r"data.tasks.edit=0.0: expected a positive"),
        ({"tasks": {"video": 1.0}}, r"data.tasks: unknown task 'video'"),
        ({"tasks": {"edit": 1.0}}, r"data.tasks: task 'edit' has a weight but no cache lists it"),
        ({"prefetch_steps": -1}, r"data.prefetch_steps=-1"),
        ({"validation": {"path": "/v", "buckets": ["1x1"]}}, r"data.validation.buckets\[0\]='1x1'"),
        ({"colour": "red"}, r"data: unknown key\(s\) \['colour'\]"),
    ],
)
def test_config_errors_name_the_field(change, match):
    d = {"caches": [{"path": "/x"}], "stages": [STAGE], **change}
    with pytest.raises(ConfigError, match=match):
        ReaderConfig.from_dict(d)


def test_config_dp_divisibility_bucket_presence_and_yaml(mixed_cache, tmp_path):
    cfg = config({"path": mixed_cache})
    with pytest.raises(
        ConfigError, match=r"data.stages\[0\].global_batch=4 is not divisible by micro_batch \* dp_size = 2 \* 4"
    ):
        CacheReader(cfg, dp_rank=0, dp_size=4)
    with pytest.raises(ConfigError, match=r"dp_rank=2"):
        CacheReader(cfg, dp_rank=2, dp_size=2)
    with pytest.raises(ConfigError, match=r"data.stages\[0\].buckets\[1\]='64x64': no cache has this bucket"):
        CacheReader(
            config({"path": mixed_cache}, stages=[{**STAGE, "buckets": ["16x16", "64x64"]}]), dp_rank=0, dp_size=1
        )
    with pytest.raises(CacheError, match=r"cache 'nope'.*not a latent cache"):
        CacheReader(config({"path": str(tmp_path / "nope")}), dp_rank=0, dp_size=1)
    run = tmp_path / "run.yaml"
    run.write_text(
        f"model: tiny\ndata:\n  seed: 3\n  caches: [{{path: {mixed_cache}}}]\n"
        "  stages: [{name: s, buckets: [16x16], micro_batch: 1, global_batch: 2}]\n"
    )
    loaded = ReaderConfig.from_yaml(run)
    assert loaded.seed == 3 and loaded.stages[0].buckets == ("16x16",)
    assert ReaderConfig.from_dict(loaded.to_dict()) == loaded


# ------------------------------------------------------------------ order, DP slicing, shapes
def test_global_order_is_deterministic_and_independent_of_dp_size(mixed_cache):
    cfg = config({"path": mixed_cache}, stages=[{**STAGE, "micro_batch": 1}], seed=7, prefetch_steps=0)
    with CacheReader(cfg, dp_rank=0, dp_size=1) as r1:
        dp1 = take(r1, 10)
    with CacheReader(cfg, dp_rank=0, dp_size=1) as again:
        assert ids(take(again, 10)) == ids(dp1)
    other = config({"path": mixed_cache}, stages=[{**STAGE, "micro_batch": 1}], seed=8, prefetch_steps=0)
    with CacheReader(other, dp_rank=0, dp_size=1) as r_other:
        assert ids(take(r_other, 10)) != ids(dp1)

    ranks = [
        CacheReader(cfg.__class__.from_dict({**cfg.to_dict(), "prefetch_steps": 2}), dp_rank=k, dp_size=2)
        for k in range(2)
    ]
    dp2 = [take(r, 10) for r in ranks]
    for r in ranks:
        r.close()
    for step in range(10):
        assert [len(dp2[k][step]) for k in range(2)] == [2, 2]  # 4 / (1 * 2) micro-batches per rank
        concat = dp2[0][step] + dp2[1][step]
        assert [s for mb in concat for s in mb.sample_ids] == ids(dp1)[step]
        assert torch.equal(torch.cat([mb.latents for mb in concat]), torch.cat([mb.latents for mb in dp1[step]]))
        buckets = {mb.bucket for mb in concat}
        shapes = {tuple(mb.latents.shape) for mb in concat}
        assert len(buckets) == 1 and len(shapes) == 1  # one bucket per step on every rank


def test_micro_batch_contents_match_the_cache(mixed_cache):
    with CacheReader(config({"path": mixed_cache}, prefetch_steps=0), dp_rank=0, dp_size=1) as r:
        (mb, _), plan = r.next_global_step(), r.last_step
    shard = open_cache(mixed_cache).snapshot()
    ref = plan.refs[0]
    sample = next(s for s in shard.shards if s.shard_id == ref.shard_id).read_sample(ref.row)
    assert mb.sample_ids[0] == sample.sample_id and mb.bucket == plan.bucket
    assert mb.latents.dtype == torch.float32 and mb.latents.shape[1] == CHANNELS
    assert torch.equal(mb.latents[0], sample.latents.float())
    n = sample.text_embedding.shape[0]
    assert mb.text.shape[2] == TEXT_DIM and mb.text.shape[1] == int(mb.text_mask.sum(1).max())
    assert torch.equal(mb.text[0, :n], sample.text_embedding.float()) and mb.text_mask[0].sum() == n
    assert not mb.text[0, n:].any()


# ------------------------------------------------------------------ resume
def test_resume_mid_epoch_continues_the_uninterrupted_sequence(mixed_cache, second_cache):
    cfg = config(
        {"path": mixed_cache, "tasks": ["t2i", "edit", "i2i"]},
        {"path": second_cache, "weight": 2.0},
        tasks={"t2i": 2.0, "edit": 1.0, "i2i": 1.0},
        seed=11,
        prefetch_steps=3,
    )
    with CacheReader(cfg, dp_rank=1, dp_size=2) as r:
        take(r, 5)
        state = json.loads(json.dumps(r.state_dict()))  # as a checkpoint stores it
        uninterrupted = take(r, 12)
    assert state["step"] == 5 and any(s["cursor"] for s in state["streams"].values())  # mid-epoch
    with CacheReader(cfg, dp_rank=1, dp_size=2) as resumed:
        resumed.load_state_dict(state)
        continued = take(resumed, 12)
    assert ids(continued) == ids(uninterrupted)
    assert [[mb.task for mb in s] for s in continued] == [[mb.task for mb in s] for s in uninterrupted]
    with CacheReader(config({"path": mixed_cache}, seed=12), dp_rank=0, dp_size=1) as wrong_seed:
        with pytest.raises(ReaderError, match="data.seed=11"):
            wrong_seed.load_state_dict({**state, "pins": {"c": 1}})


def test_resume_refuses_a_changed_curriculum_unless_told_to_replan(mixed_cache):
    base = dict(stages=[STAGE], tasks={"t2i": 1.0}, seed=3, prefetch_steps=0)
    with CacheReader(config({"path": mixed_cache}, **base), dp_rank=0, dp_size=1) as r:
        take(r, 3)
        state = json.loads(json.dumps(r.state_dict()))
    changed = dict(base, stages=[{**STAGE, "global_batch": 8, "buckets": ["16x16"]}], tasks={"t2i": 1.0, "i2i": 1.0})
    with CacheReader(config({"path": mixed_cache}, **changed), dp_rank=0, dp_size=1) as r:
        with pytest.raises(
            ReaderError,
            match=r"another curriculum \(data.stages\[0\].buckets: saved \['16x16', "
            r"'32x32'\], now \['16x16'\]; data.stages\[0\].global_batch: saved 4, "
            r"now 8; data.stages\[0\].tasks: .*data.replan_on_resume: true",
        ):
            r.load_state_dict(state)
    with CacheReader(config({"path": mixed_cache}, **changed, replan_on_resume=True), dp_rank=0, dp_size=1) as r:
        r.load_state_dict(state)
        step = r.next_global_step()
        assert r.last_step.step == 3 and sum(mb.batch_size for mb in step) == 8
    # The same curriculum resumes as before (a state without the record, from older runs, too).
    with CacheReader(config({"path": mixed_cache}, **base), dp_rank=0, dp_size=1) as r:
        r.load_state_dict({k: v for k, v in state.items() if k != "curriculum"})
        r.load_state_dict(state)


# ------------------------------------------------------------------ tasks, caches, curriculum
def _planned(cfg: ReaderConfig, n: int):
    planner = Planner(cfg, {c.name: CacheCatalog(c) for c in cfg.caches})
    return [planner.next_step() for _ in range(n)]


def test_task_mixing_weights_and_shapes(mixed_cache):
    cfg = config(
        {"path": mixed_cache, "tasks": ["t2i", "edit", "i2i"]},
        tasks={"t2i": 3.0, "edit": 1.0, "i2i": 1.0},
        prefetch_steps=0,
        seed=5,
    )
    plans = _planned(cfg, 400)
    share = {t: c / 400 for t, c in Counter(p.task for p in plans).items()}
    assert share == pytest.approx({"t2i": 0.6, "edit": 0.2, "i2i": 0.2}, abs=0.06)
    with CacheReader(cfg, dp_rank=0, dp_size=1) as r:
        seen = set()
        for step in take(r, 40):
            mb = step[0]
            seen.add(mb.task)
            assert all(m.task == mb.task for m in step)
            edit_ids = [s for s in mb.sample_ids if int(s.rsplit("-", 1)[1]) >= 6]  # last 2 of 8 per shard
            if mb.task == "t2i":
                assert mb.condition_latents == [] and not edit_ids
            elif mb.task == "i2i":
                (cond,) = mb.condition_latents
                assert torch.equal(cond, mb.latents) and not edit_ids
            else:
                (cond,) = mb.condition_latents
                assert cond.shape == mb.latents.shape and len(edit_ids) == mb.batch_size
                assert (cond < -50).all()  # the helpers' condition latents sit around -100
        assert seen == {"t2i", "edit", "i2i"}


def test_multi_cache_weights(mixed_cache, second_cache):
    cfg = config({"path": mixed_cache, "weight": 3.0}, {"path": second_cache, "weight": 1.0}, seed=2)
    plans = _planned(cfg, 400)
    assert Counter(p.cache for p in plans)["c"] / 400 == pytest.approx(0.75, abs=0.06)
    for p in plans:  # a step never mixes caches
        assert {r.shard_id.startswith("B") for r in p.refs} == {p.cache == "c2"}


def test_curriculum_stages_switch_buckets_and_batch_sizes_then_end(mixed_cache):
    stages = [
        {"name": "low", "buckets": ["16x16"], "micro_batch": 2, "global_batch": 4, "steps": 3},
        {"name": "high", "buckets": ["32x32"], "micro_batch": 1, "global_batch": 2, "steps": 2},
    ]
    with CacheReader(config({"path": mixed_cache}, stages=stages), dp_rank=0, dp_size=1) as r:
        steps, names = [], []
        for step in r:
            steps.append(step)
            names.append(r.last_step.stage_name)
    assert names == ["low"] * 3 + ["high"] * 2
    assert [[tuple(mb.latents.shape) for mb in s] for s in steps] == [[(2, 16, 2, 2)] * 2] * 3 + [
        [(1, 16, 4, 4)] * 2
    ] * 2


def test_static_text_length(mixed_cache):
    with CacheReader(config({"path": mixed_cache}, text_length=8, prefetch_steps=0), dp_rank=0, dp_size=1) as r:
        for mb in r.next_global_step():
            assert mb.text.shape == (2, 8, TEXT_DIM) and mb.text_mask.shape == (2, 8)
    # A sample longer than the static text length is refused when the reader is built (before
    # step 0), naming the longest sample, not in the middle of training.
    longest = max(s.text_len for shard in open_cache(mixed_cache).snapshot().shards for s in _metas(shard))
    with pytest.raises(
        ConfigError,
        match=rf"data.text_length=1: cache .* holds sample p\d-\S+ \(shard .*\) "
        rf"with {longest} text tokens; set data.text_length to at least {longest}",
    ):
        CacheReader(config({"path": mixed_cache}, text_length=1, prefetch_steps=0), dp_rank=0, dp_size=1)


def _metas(shard):
    from megatron_qwenimage.cache import SampleMeta

    table = shard.samples
    return [
        SampleMeta(
            **{
                k: table.column(k)[i].as_py()
                for k in (
                    "sample_id",
                    "task",
                    "caption",
                    "source_uri",
                    "condition_uri",
                    "text_len",
                    "text_truncated",
                    "orig_height",
                    "orig_width",
                )
            }
        )
        for i in range(table.num_rows)
    ]


@pytest.mark.parametrize("mode", ["grow", "tail"])
def test_static_text_length_checks_a_grown_snapshot_before_reading_it(tmp_path, mode):
    from megatron_qwenimage.cache import SampleMeta, ShardTensors
    from megatron_qwenimage.cache.shard_format import offsets_from_lengths
    from megatron_qwenimage.cache.writer import ShardPayload

    path = tmp_path / "g"
    publish(path, "p0", [payload(B16, 8, prefix="p0", seed=0)])  # text lengths 1..8
    n, long = 4, 12
    latents = torch.randn(n, CHANNELS, 2, 2).to(torch.bfloat16)
    text = torch.randn(n * long, TEXT_DIM).to(torch.bfloat16)
    metas = [SampleMeta(f"long-{i}", "t2i", "c", f"file://long/{i}", None, long, False, 16, 16) for i in range(n)]
    cfg = config(
        {"path": str(path), "mode": mode},
        stages=[{**STAGE, "buckets": ["16x16"]}],
        prefetch_steps=0,
        text_length=8,
        tail_poll_s=0.05,
        tail_timeout_s=30.0,
    )
    with CacheReader(cfg, dp_rank=0, dp_size=1) as r:
        take(r, 2)  # the first epoch of v1
        publish(path, "p1", [ShardPayload(B16, ShardTensors(latents, text, offsets_from_lengths([long] * n)), metas)])
        # v2 enters at the first epoch boundary planned after a consumed step saw it (step 4).
        with pytest.raises(ConfigError, match=r"snapshot v2 holds sample long-\d \(shard p1-16x16\) with 12 text"):
            take(r, 3)


# ------------------------------------------------------------------ tailing a growing cache
def _tail_config(path, **kw) -> ReaderConfig:
    stage = {"name": "s", "buckets": ["16x16"], "micro_batch": 2, "global_batch": 4}
    return config({"path": str(path), "mode": "tail"}, stages=[stage], tail_poll_s=0.05, **kw)


def test_tail_new_shards_enter_at_the_epoch_boundary_each_sample_once(tmp_path):
    path = tmp_path / "grow"
    publish(path, "p0", [payload(B16, 8, prefix="p0", seed=0)])  # v1: 8 samples = 2 steps
    with CacheReader(_tail_config(path, tail_timeout_s=30.0, prefetch_steps=2), dp_rank=0, dp_size=1) as r:
        first = take(r, 1)
        publish(path, "p1", [payload(B16, 8, prefix="p1", seed=1)])  # v2, committed mid-epoch
        publish(path, "p2", [payload(B16, 4, prefix="p2", seed=2), payload(B32, 4, prefix="x", seed=3)])  # v3
        rest = take(r, 4)
        assert [r.last_step.snapshot_version] == [3]
    per_step = ids(first + rest)
    prefixes = [{s.split("-")[0] for s in step} for step in per_step]
    assert prefixes == [{"p0"}, {"p0"}, {"p1"}, {"p1"}, {"p2"}]  # epoch by epoch, one snapshot each
    flat = [s for step in per_step for s in step]
    assert len(flat) == len(set(flat)) == 20  # each sample once


def test_tail_waits_logs_and_times_out_naming_the_cache(tmp_path, caplog):
    path = tmp_path / "slow"
    publish(path, "p0", [payload(B16, 4, prefix="p0", seed=0)])
    caplog.set_level(logging.INFO, logger="megatron_qwenimage.data")
    with CacheReader(_tail_config(path, tail_timeout_s=20.0), dp_rank=0, dp_size=1) as r:
        take(r, 1)
        late = threading.Timer(0.3, publish, args=(path, "p1", [payload(B16, 4, prefix="p1", seed=1)]))
        late.start()
        (mb, _) = r.next_global_step()  # waits until the timer commits p1
        late.join()
        assert all(s.startswith("p1-") for s in mb.sample_ids)
    assert any("waiting for a newer snapshot" in m and "cache 'slow'" in m for m in caplog.messages)
    with CacheReader(_tail_config(path, tail_timeout_s=0.2), dp_rank=0, dp_size=1) as r:
        take(r, 2)
        with pytest.raises(TailTimeoutError, match=rf"cache 'slow' \({path}\).*up to snapshot v2 is consumed"):
            r.next_global_step()


def test_grow_repins_the_newest_snapshot_at_the_epoch_boundary(tmp_path):
    path = tmp_path / "g"
    publish(path, "p0", [payload(B16, 8, prefix="p0", seed=0)])  # v1: 2 steps per epoch
    cfg = config({"path": str(path), "mode": "grow"}, stages=[{**STAGE, "buckets": ["16x16"]}], prefetch_steps=0)
    with CacheReader(cfg, dp_rank=0, dp_size=1) as r:
        first = take(r, 1)
        publish(path, "p1", [payload(B16, 8, prefix="p1", seed=1)])  # v2
        rest, pins = [], []
        for _ in range(5):
            rest.append(r.next_global_step())
            pins.append(r.last_step.snapshot_version)
    assert pins == [1, 2, 2, 2, 2]
    epoch1, epoch2 = ids(first + rest[:1]), ids(rest[1:])
    assert all(s.startswith("p0-") for step in epoch1 for s in step)
    assert sorted(s for step in epoch2 for s in step) == sorted([f"p{p}-{i}" for p in (0, 1) for i in range(8)])


# ------------------------------------------------------------------ corruption, validation
def test_corrupted_shard_error_names_the_shard(tmp_path):
    path = tmp_path / "bad"
    publish(path, "good", [payload(B16, 4, prefix="g", seed=0)], snapshot=False)
    publish(path, "evil", [payload(B16, 4, prefix="e", seed=1)])
    bad = next(s for s in open_cache(str(path)).snapshot().shards if s.shard_id.startswith("evil"))
    victim = next(
        p for p in (path / bad.path / "tensors.zarr" / "latents").rglob("*") if p.is_file() and p.name != "zarr.json"
    )
    data = bytearray(victim.read_bytes())
    data[3] ^= 0xFF
    victim.write_bytes(bytes(data))
    cfg = config({"path": str(path)}, stages=[{**STAGE, "buckets": ["16x16"]}])
    with CacheReader(cfg, dp_rank=0, dp_size=1) as r:
        with pytest.raises(ShardChecksumError, match=r"shard evil-16x16: file .*latents"):
            take(r, 2)
        with pytest.raises(ShardChecksumError):  # stays failed
            r.next_global_step()


def test_corrupted_samples_table_is_reported_by_checksum(tmp_path):
    path = tmp_path / "bad"
    publish(path, "evil", [payload(B16, 4, prefix="e", seed=1)])
    bad = open_cache(str(path)).snapshot().shards[0]
    table = path / bad.path / "samples.parquet"
    table.write_bytes(b"not parquet" + table.read_bytes()[11:])
    cfg = config({"path": str(path)}, stages=[{**STAGE, "buckets": ["16x16"]}])
    with pytest.raises(ShardChecksumError, match=r"shard evil-16x16: file .*samples.parquet"):
        with CacheReader(cfg, dp_rank=0, dp_size=1) as r:
            take(r, 1)


def test_validation_batches_are_fixed_and_split_over_ranks(mixed_cache):
    vcfg = ValidationConfig(mixed_cache, pin=1, tasks=("t2i", "edit"), samples_per_bucket=5, micro_batch=2)
    with pytest.raises(ConfigError, match=r"data.text_length=1: cache 'validation'"):
        ValidationReader(vcfg, text_length=1)
    whole = ValidationReader(vcfg).batches()
    assert [(mb.task, mb.bucket, mb.batch_size) for mb in whole] == [
        (t, b, n) for b in ("16x16", "32x32") for t in ("t2i", "edit") for n in (2, 2, 1)
    ]
    assert ids([ValidationReader(vcfg).batches()]) == ids([whole])
    halves = [ValidationReader(vcfg, dp_rank=k, dp_size=2).batches() for k in range(2)]
    assert sorted(ids([halves[0] + halves[1]])[0]) == sorted(ids([whole])[0])
    assert all(len(mb.condition_latents) == (mb.task == "edit") for mb in whole)
    with pytest.raises(ConfigError, match=r"data.validation.buckets\[0\]='64x64'.*has no such bucket"):
        ValidationReader(ValidationConfig(mixed_cache, buckets=("64x64",)))


# ------------------------------------------------------------------ direct shard access
def test_direct_shard_access_equals_zarr(tmp_path, monkeypatch):
    import numpy as np
    import zarr

    from megatron_qwenimage.cache.shard_access import ShardedArray
    from megatron_qwenimage.data import reader as reader_mod

    path = tmp_path / "direct"
    publish(path, "p", [payload(B32, 90, prefix="d", seed=4, edit=3)])  # > 256 text rows: chunk crossings
    (shard,) = open_cache(str(path)).snapshot().shards
    group = zarr.open_group(str(path / shard.path / "tensors.zarr"), mode="r")
    offsets = np.asarray(group["text_offsets"][:])
    assert offsets[-1] > 256
    for name in ("latents", "text_embeddings", "condition_latents", "text_offsets"):
        direct = ShardedArray.open(shard.storage, f"{shard.path}/tensors.zarr/{name}")
        assert direct is not None, name
        n = group[name].shape[0]
        spans = (
            [(i, i + 1) for i in range(n)] + [(0, n), (250, 260)]
            if name == "text_embeddings"
            else [(i, i + 1) for i in range(n)]
        )
        for lo, hi in spans:
            assert np.array_equal(direct.rows(lo, hi), np.asarray(group[name][lo:hi])), (name, lo, hi)
        direct.close()

    cfg = config(
        {"path": str(path), "tasks": ["t2i", "edit"]},
        tasks={"t2i": 1.0, "edit": 1.0},
        stages=[{"name": "s", "buckets": ["32x32"], "micro_batch": 3, "global_batch": 3}],
        prefetch_steps=0,
    )
    with CacheReader(cfg, dp_rank=0, dp_size=1) as r:
        fast = take(r, 8)
    monkeypatch.setattr(reader_mod.ShardedArray, "open", classmethod(lambda cls, *a: None))
    with CacheReader(cfg, dp_rank=0, dp_size=1) as r:
        slow = take(r, 8)
    for a, b in zip(fast, slow):
        for x, y in zip(a, b):
            assert x.sample_ids == y.sample_ids and torch.equal(x.latents, y.latents) and torch.equal(x.text, y.text)
            assert all(torch.equal(c, d) for c, d in zip(x.condition_latents, y.condition_latents))


def test_benchmark_script_smoke(capsys):
    """benchmarks/reader.py runs end to end on a tiny cache (its plumbing; no timing asserted)."""
    import importlib.util
    import sys
    from pathlib import Path

    bench_path = Path(__file__).resolve().parents[2] / "benchmarks" / "reader.py"
    spec = importlib.util.spec_from_file_location("reader_bench", bench_path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    argv = [
        "--bucket",
        "32x32",
        "--task",
        "edit",
        "--partitions",
        "1",
        "--samples",
        "8",
        "--micro-batch",
        "2",
        "--reader-steps",
        "2",
        "--model-steps",
        "1",
        "--json",
    ]
    assert bench.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["image_tokens"] == 4 and result["task"] == "edit"
    assert result["reader_samples_per_s"] > 0 and result["model_samples_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["reader_samples_per_s"] / result["model_samples_per_s"])
