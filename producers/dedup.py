"""Content-hash dedup across partitions, decided against COMMITTED samples only.

Invariant: every input ends committed (a sample of its partition's committed shards),
quarantined (with a reason), or a duplicate of a committed sample: a duplicate row names the
partition (``duplicate_of``) whose commit record holds a sample with the row's content hash,
either another partition committed before the decision or the row's own partition (a copy
inside one partition attempt, committed together with the original or not at all).

``claims/<hh>/<content_hash>.json`` (``{"partition_id", "claimed_unix"}``) is advisory: it says
which partition is expected to hold the content. It never makes an input a duplicate by
itself; only the claimed partition's commit record (and the ``sample_id`` column of its shards)
does, and commit records are immutable, so a duplicate of a committed sample stays one. A claim
whose partition never commits (producer died, rerun with another partitioning) therefore
costs nothing but a check: the other copies are encoded and committed, and the first
partition to commit the content points the claim at itself (`repoint_claims`). Any number of
partitions may rewrite a claim concurrently; each of them has committed the content, so
whichever write lands last the claim names a committed holder. There is no takeover that
grants the right to skip an input, so nothing needs to be exclusive beyond the first create.

Cost of this rule: two partitions holding the same content that are written at the same moment
(each checks before the other's commit record exists) both commit it; the sample is then in
the cache twice (never lost). Partitions written one after the other keep it once.
"""

from __future__ import annotations

import json
import time

from megatron_qwenimage.cache.commit import CommitError, read_commit
from megatron_qwenimage.cache.shard_format import read_samples
from megatron_qwenimage.cache.storage import CacheError, CacheStorage
from producers.row import ProducerRow

CLAIMS_DIR = "claims"


def claim_path(content_hash: str) -> str:
    return f"{CLAIMS_DIR}/{content_hash[:2]}/{content_hash}.json"


def _claim_record(partition_id: str) -> bytes:
    return json.dumps({"partition_id": partition_id, "claimed_unix": time.time()}).encode()


def read_claim(storage: CacheStorage, content_hash: str) -> str | None:
    """The partition the claim of `content_hash` names, or None without a (readable) claim."""
    try:
        return str(json.loads(storage.read_bytes(claim_path(content_hash)))["partition_id"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def claim_content(storage: CacheStorage, content_hash: str, partition_id: str) -> str:
    """Claim `content_hash` for `partition_id` unless claimed; returns the partition the claim names.

    A claim is advisory (see the module docstring): the caller may treat its input as a
    duplicate only if `CommittedContent.holds` (owner, content_hash) is True.
    """
    if storage.write_exclusive(claim_path(content_hash), _claim_record(partition_id)):
        return partition_id
    owner = read_claim(storage, content_hash)
    return partition_id if owner is None else owner


class CommittedContent:
    """Which content hashes committed partitions hold (commit record + ``sample_id`` of its shards).

    A partition found uncommitted is remembered as holding nothing for the life of this object:
    the answer may only become stale towards "not a duplicate" (encode it), never the reverse.
    An unreadable record counts as holding nothing, for the same reason.
    """

    def __init__(self, storage: CacheStorage) -> None:
        self.storage = storage
        self._held: dict[str, frozenset[str]] = {}

    def hashes(self, partition_id: str) -> frozenset[str]:
        if partition_id not in self._held:
            held: set[str] = set()
            try:
                record = read_commit(self.storage, partition_id)
                for shard in record.shards if record is not None else []:
                    held.update(read_samples(self.storage, shard.path).column("sample_id").to_pylist())
            except (CacheError, CommitError, OSError, ValueError):
                held = set()
            self._held[partition_id] = frozenset(held)
        return self._held[partition_id]

    def holds(self, partition_id: str, content_hash: str) -> bool:
        return content_hash in self.hashes(partition_id)


def resolve_duplicates(
    storage: CacheStorage, partition_id: str, rows: list[ProducerRow]
) -> tuple[list[ProducerRow], set[str]]:
    """Final dedup decision of one partition's rows, just before it is written.

    * an encoded input whose content is claimed by another partition that has committed it
      by now becomes a duplicate of that partition (its encodings are dropped);
    * a copy inside this partition (``duplicate_of`` == this partition) follows its original:
      duplicate of the other partition if the original was dropped so, quarantined with the
      original's reason if the original was quarantined (e.g. ``caption_too_long``);
    * duplicates of other partitions were checked against their commit records already.

    Returns the new rows and the content hashes this partition will commit although a claim
    names another partition (or none): `repoint_claims` points those claims here after the commit.
    """
    by_input: dict[str, list[ProducerRow]] = {}
    for r in rows:
        by_input.setdefault(r["input_id"], []).append(r)
    state: dict[str, str] = {}
    for input_id, group in by_input.items():
        if any(r["kind"] == "quarantine" for r in group):
            state[input_id] = "quarantine"
        else:
            state[input_id] = group[0]["kind"]
    # content hash -> the (first) input of this partition that holds it, encoded or quarantined
    original: dict[str, str] = {}
    for input_id, group in by_input.items():
        h = group[0]["content_hash"]
        if h and state[input_id] == "encode":
            original.setdefault(h, input_id)
    for input_id, group in by_input.items():
        h = group[0]["content_hash"]
        if h and state[input_id] == "quarantine" and h not in original:
            original[h] = input_id

    committed = CommittedContent(storage)
    taken: dict[str, str] = {}  # content hash -> committed partition that holds it
    repoint: set[str] = set()
    for h, input_id in original.items():
        if state[input_id] != "encode":
            continue
        owner = read_claim(storage, h)
        if owner == partition_id:
            continue
        if owner is not None and committed.holds(owner, h):
            taken[h] = owner
        else:
            repoint.add(h)

    out: list[ProducerRow] = []
    for input_id, group in by_input.items():
        first = group[0]
        h = first["content_hash"]
        if state[input_id] == "encode" and h in taken:
            out.append(_as_duplicate(first, taken[h]))
        elif state[input_id] == "duplicate" and first["duplicate_of"] == partition_id:
            src = original.get(h)
            if h in taken:
                out.append(_as_duplicate(first, taken[h]))
            elif src is not None and state[src] == "encode":
                out.append(first)
            elif src is not None:
                bad = next(r for r in by_input[src] if r["kind"] == "quarantine")
                out.append(
                    first
                    | {
                        "kind": "quarantine",
                        "reason": bad["reason"],
                        "duplicate_of": "",
                        "detail": f"{first['source_uri']}: same content as input {src}, quarantined: {bad['detail']}",
                    }
                )
            else:
                raise RuntimeError(
                    f"partition {partition_id}: input {input_id} is a duplicate of content "
                    f"{h} that no input of the partition holds"
                )
        else:
            out.extend(group)
    return out, repoint


def _as_duplicate(row: ProducerRow, owner: str) -> ProducerRow:
    return row | {
        "kind": "duplicate",
        "duplicate_of": owner,
        "reason": "",
        "detail": "",
        "area": "",
        "latents": b"",
        "cond_latents": b"",
        "text": b"",
        "pixels": b"",
        "cond_pixels": b"",
        "vl_pixels": b"",
    }


def repoint_claims(storage: CacheStorage, partition_id: str, content_hashes: set[str]) -> None:
    """After `partition_id` committed `content_hashes`: point their claims at it, unless the
    claim already names a partition that has committed the content."""
    committed = CommittedContent(storage)
    for h in sorted(content_hashes):
        if storage.write_exclusive(claim_path(h), _claim_record(partition_id)):
            continue
        owner = read_claim(storage, h)
        if owner == partition_id or (owner is not None and committed.holds(owner, h)):
            continue
        storage.write_atomic(claim_path(h), _claim_record(partition_id))
