"""DCP's ``.metadata`` is read without ``pickle.load`` (`megatron_qwenimage.checkpoint_metadata`).

Must show: a checkpoint DCP wrote reads through `RestrictedFileSystemReader` exactly as through
DCP's own reader, and a training checkpoint saved on two ranks resumes through it with
``pickle.load`` out of reach; a tampered ``.metadata`` whose pickle would call ``builtins.exec``,
``os.system``, ``builtins.open`` or a function reached through an admitted module is refused with
one error naming the file, and its payload (creating a marker file) never runs: at resume on every
rank, at export, and when read directly. The payloads are live: DCP's own reader runs each of them
(the control). A well-formed file that is not a tensor checkpoint (a bytes entry, a data file
outside the directory) is refused too.
"""

from __future__ import annotations

import os
import pickle
import shlex
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from consumers.checkpoint import export_checkpoint_to_diffusers
from megatron_qwenimage.checkpoint_metadata import CheckpointMetadataRefused, RestrictedFileSystemReader
from tests.helpers.consumers import spawn, vouch_for

METADATA = ".metadata"


class _Call:
    """Pickles as the call ``fn(*args)``: what a tampered file makes the unpickler run."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _payloads(marker: Path) -> dict:
    """Payloads that each create `marker` when unpickled (the value stored in the metadata)."""
    return {
        "exec": _Call(exec, f"open({str(marker)!r}, 'w').close()"),
        "os.system": _Call(os.system, f"touch {shlex.quote(str(marker))}"),
        "open": _Call(open, str(marker), "w"),
    }


def _through_admitted_module(marker: Path) -> bytes:
    """A whole ``.metadata`` pickle calling ``os.system`` reached as an attribute path of DCP's own
    metadata module (protocol 4 resolves dotted names): only an exact allow-list stops it."""
    module, name, cmd = "torch.distributed.checkpoint.metadata", "os.system", f"touch {shlex.quote(str(marker))}"
    ops = [b"\x80\x04"]
    for text in (module, name):
        ops.append(b"\x8c" + bytes([len(text)]) + text.encode())
    ops.append(b"\x93")  # STACK_GLOBAL
    ops.append(b"\x8c" + bytes([len(cmd)]) + cmd.encode() + b"\x85R.")  # (cmd,) REDUCE STOP
    return b"".join(ops)


def _save(directory: Path) -> dict[str, torch.Tensor]:
    state = {
        "model/w": torch.randn(6, 4),
        "model/b": torch.randn(4).to(torch.bfloat16),
        "optim/w/exp_avg": torch.arange(24, dtype=torch.float32).reshape(6, 4),
        "step": torch.tensor(7, dtype=torch.int64),
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(directory), no_dist=True)
    return state


def _rewrite_metadata(directory: Path, change) -> None:
    """Re-pickle `directory`'s metadata (read safely) after ``change(metadata)``, as a tamperer would."""
    metadata = RestrictedFileSystemReader(directory).read_metadata()
    change(metadata)
    (directory / METADATA).write_bytes(pickle.dumps(metadata))


def _no_plain_pickle(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the metadata was read with plain pickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def test_restricted_reader_reads_what_dcp_wrote_as_dcp_does(tmp_path, monkeypatch):
    saved = _save(tmp_path / "ckpt")
    stock = dcp.FileSystemReader(str(tmp_path / "ckpt"))
    want = stock.read_metadata()
    _no_plain_pickle(monkeypatch)
    reader = RestrictedFileSystemReader.checked(tmp_path / "ckpt")
    got = reader.read_metadata()
    assert got.state_dict_metadata == want.state_dict_metadata
    assert got.storage_data == want.storage_data
    assert (got.planner_data, got.version) == (want.planner_data, want.version)
    assert got.storage_meta.save_id == want.storage_meta.save_id
    assert got.storage_meta.load_id == reader.load_id and want.storage_meta.load_id == stock.load_id
    state = {k: torch.zeros_like(v) for k, v in saved.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=True)
    for key, value in saved.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("payload", ["exec", "os.system", "open", "admitted_module_path"])
def test_tampered_metadata_is_refused_and_never_runs(tmp_path, payload):
    directory, marker = tmp_path / "ckpt", tmp_path / "payload-ran"
    _save(directory)
    if payload == "admitted_module_path":
        (directory / METADATA).write_bytes(_through_admitted_module(marker))
        named = "torch.distributed.checkpoint.metadata.os.system"
    else:
        _rewrite_metadata(directory, lambda md: setattr(md, "version", _payloads(marker)[payload]))
        named = {"exec": "builtins.exec", "os.system": f"{os.system.__module__}.system", "open": "io.open"}[payload]
    with pytest.raises(CheckpointMetadataRefused) as refused:
        RestrictedFileSystemReader.checked(directory)
    message = str(refused.value)
    assert f"{directory / METADATA}: refused, it names {named}" in message and "\n" not in message
    assert not marker.exists()
    # The control: DCP's own reader runs the payload.
    try:
        dcp.FileSystemReader(str(directory)).read_metadata()
    except Exception:
        pass  # a whole-file payload leaves no Metadata behind; it has run by then
    assert marker.exists(), "the payload is not live: this test would prove nothing"


def test_metadata_that_is_no_tensor_checkpoint_is_refused(tmp_path):
    cases = {
        "bytes entry": (
            lambda md: md.state_dict_metadata.__setitem__("model/w", BytesStorageMetadata()),
            "entry 'model/w' is a pickled object (BytesStorageMetadata)",
        ),
        "data outside": (
            lambda md: next(iter(md.storage_data.values())).__setattr__("relative_path", "../../elsewhere.distcp"),
            "is said to be in '../../elsewhere.distcp', not a file of the checkpoint",
        ),
        "not metadata": (None, "it holds a dict, not DCP's Metadata"),
        "truncated": (None, "unreadable (UnpicklingError"),
    }
    for name, (change, needle) in cases.items():
        directory = tmp_path / name.replace(" ", "_")
        _save(directory)
        if change is not None:
            _rewrite_metadata(directory, change)
        elif name == "not metadata":
            (directory / METADATA).write_bytes(pickle.dumps({"state_dict_metadata": {}}))
        else:
            data = (directory / METADATA).read_bytes()
            (directory / METADATA).write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointMetadataRefused) as refused:
            RestrictedFileSystemReader.checked(directory)
        assert f"checkpoint metadata {directory / METADATA}: " in str(refused.value), name
        assert needle in str(refused.value), (name, str(refused.value))


def _resume_and_export_worker(rank: int, world: int, root: str) -> dict:
    """TP2: save, resume (and export on rank 0) with plain pickle out of reach; then rank 0 tampers
    with ``.metadata`` (an ``exec`` payload, COMMITTED rewritten to match) and every rank tries to
    resume, rank 0 to export."""
    import torch.distributed as dist

    from consumers.checkpoint import CheckpointConfig, CheckpointManager, ResumeRefused
    from consumers.parallel import ParallelLayout
    from tests.consumers.ckpt_workers import _engine

    pstate, engine = _engine(ParallelLayout(tp=2))
    mgr = CheckpointManager(CheckpointConfig(dir=root), pstate)
    step_dir = mgr.save(2, engine, {})
    plain_load, plain_loads = pickle.load, pickle.loads
    pickle.load = pickle.loads = _refuse_plain_pickle
    try:
        resumed = mgr.load_latest(engine)["step"]
        if rank == 0:
            export_checkpoint_to_diffusers(step_dir, Path(root).parent / "diffusers-ok")
    finally:
        pickle.load, pickle.loads = plain_load, plain_loads
    marker = Path(root).parent / "payload-ran"
    if rank == 0:
        _rewrite_metadata(step_dir, lambda md: setattr(md, "version", _payloads(marker)["exec"]))
        vouch_for(step_dir, METADATA)
    dist.barrier()
    try:
        mgr.load_latest(engine)
        stopped = ""
    except ResumeRefused as exc:
        stopped = str(exc)
    exported = ""
    if rank == 0:
        try:
            export_checkpoint_to_diffusers(step_dir, Path(root).parent / "diffusers")
        except CheckpointMetadataRefused as exc:
            exported = str(exc)
    dist.barrier()
    return {
        "resumed": resumed,
        "stopped": stopped,
        "refused": mgr.refused,
        "exported": exported,
        "metadata": str(step_dir / METADATA),
        "ran": marker.exists(),
        "export_dir": (Path(root).parent / "diffusers").exists(),
        "exported_ok": (Path(root).parent / "diffusers-ok" / "config.json").is_file(),
    }


def _refuse_plain_pickle(*args, **kwargs):
    raise AssertionError("the metadata was read with plain pickle")


def test_tampered_checkpoint_is_refused_at_resume_and_export(tmp_path):
    results = spawn(_resume_and_export_worker, 2, tmp_path / "out", str(tmp_path / "ckpt"))
    assert sorted(results) == [0, 1]
    for rank, r in results.items():
        assert r["resumed"] == 2, rank  # the legitimate checkpoint resumes through the restricted reader
        refusal = f"{r['metadata']}: refused, it names builtins.exec"
        assert len(r["refused"]) == 1 and refusal in r["refused"][0], (rank, r["refused"])
        assert refusal in r["stopped"], (rank, r["stopped"])
        assert not r["ran"], rank
    assert results[0]["exported_ok"]  # before the tampering, the export read it through the restricted reader
    assert refusal in results[0]["exported"] and not results[0]["export_dir"]
