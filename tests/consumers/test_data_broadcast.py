"""One rank per data-parallel replica reads the cache; its TP/PP peers receive the step's samples.

Two gloo ranks form one TP=2 replica: only the source rank opens and verifies shards, the peer's
micro-batches are bit-identical to what it would have read itself (t2i and edit samples, two
buckets), and a corrupted shard found by the reading rank stops its peer with the reader's
message instead of leaving it waiting in the broadcast. The wire keeps every bfloat16 value:
magnitudes over float16's 65504 and under its smallest subnormal arrive bit for bit.
"""

from __future__ import annotations

import torch

from tests.consumers.broadcast_workers import broadcast_worker, synthetic_exact_worker, synthetic_micro_batches
from tests.helpers.consumers import corrupt_latent_chunk, spawn
from tests.helpers.reader import B16, B32, make_cache

STEPS = 6


def test_peer_receives_exactly_what_it_would_read_and_opens_nothing(tmp_path):
    cache = make_cache(tmp_path / "cache", partitions=2, per_bucket={B16: 8, B32: 8}, edit=4)
    results = spawn(broadcast_worker, 2, tmp_path / "out", cache, STEPS)
    reader, peer = results[0], results[1]
    assert reader["reads"] and not peer["reads"]
    assert reader["error"] is None and peer["error"] is None
    assert peer["counts"] == {"verify": 0, "open": 0}
    assert reader["counts"]["verify"] >= 1 and reader["counts"]["verify"] == reader["counts"]["open"]
    assert peer["received"] == peer["own"] == reader["received"]
    tasks = {mb["task"] for step in peer["received"] for mb in step}
    assert tasks == {"t2i", "edit"}, tasks  # condition latents travel too


def test_a_corrupted_shard_stops_the_peer_with_the_readers_message(tmp_path):
    cache = make_cache(tmp_path / "cache", partitions=1, per_bucket={B16: 8, B32: 8}, edit=4)
    shard = corrupt_latent_chunk(cache)
    results = spawn(broadcast_worker, 2, tmp_path / "out", cache, 2)
    assert results[0]["error"] is not None and shard.shard_id in results[0]["error"], results[0]
    peer_error = results[1]["error"]
    assert peer_error is not None and "rank 0 could not load its data" in peer_error, peer_error
    assert "ShardChecksumError" in peer_error and shard.shard_id in peer_error, peer_error


def test_the_wire_keeps_every_bfloat16_value(tmp_path):
    """Values the cache can hold (bf16) but float16 cannot: a float16 wire would change them."""
    for step in range(2):
        for mb in synthetic_micro_batches(step):
            for values in (mb.latents, mb.text, *mb.condition_latents):
                assert torch.equal(values.bfloat16().float(), values)
                assert (values.half().float() != values).float().mean() > 0.5
    results = spawn(synthetic_exact_worker, 2, tmp_path / "out", 2)
    reader, peer = results[0], results[1]
    assert reader["reads"] and not peer["reads"]
    assert peer["sent"] == reader["sent"]  # both ranks build the same originals
    assert peer["received"] == reader["received"] == reader["sent"]
    assert [mb["task"] for step in peer["received"] for mb in step] == ["t2i", "t2i", "edit", "edit"]
