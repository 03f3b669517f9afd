"""Must show: a run never silently starts over and never deletes checkpoints it did not write.

* ``checkpoint.resume``: ``auto`` starts fresh only in a directory without committed checkpoints
  and otherwise stops with one `ResumeRefused` naming every checkpoint and why it was refused
  (deleting nothing); ``required`` needs a loadable one; ``never`` refuses a directory that holds
  committed checkpoints; ``load: false`` is ``resume: never``.
* A checkpoint whose saved architecture differs from the run's is refused naming the field and
  both values; layout/kernel build options may differ.
* Keep-last-N prunes only this run's own checkpoints; a corrupt newest falls back to the previous
  one and, when this run reaches that step again, the corrupt one is set aside, not deleted.
* Async save stages on the host and is committed by `poll` as soon as the write is done (no
  second save needed), holding the state at the save.
* The CLI turns a refusal into a one-line message and exit status 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from consumers.checkpoint import CheckpointConfig, model_config_differences
from megatron_qwenimage.config import ConfigError, load_config
from tests.consumers.ckpt_workers import async_poll_worker, resume_policy_worker
from tests.helpers.consumers import run_config, spawn, write_cache

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_resume_config_validation():
    assert CheckpointConfig(dir="c").resume == "auto" and CheckpointConfig(dir="c").load is True
    assert CheckpointConfig(dir="c", load=False).resume == "never"
    assert CheckpointConfig(dir="c", resume="never").load is False
    assert CheckpointConfig(dir="c", resume="required", load=True).resume == "required"
    with pytest.raises(ConfigError, match=r"checkpoint\.resume='sometimes'"):
        CheckpointConfig(dir="c", resume="sometimes")
    with pytest.raises(ConfigError, match=r"checkpoint\.load=false contradicts"):
        CheckpointConfig(dir="c", resume="required", load=False)
    with pytest.raises(ConfigError, match=r"checkpoint\.load"):
        CheckpointConfig(dir="c", load="no")


def test_model_config_differences():
    run = load_config("tiny-16ch", num_layers=4).to_dict()
    layout_only = dict(run, tensor_model_parallel_size=2, sequence_parallel=True, fused_elementwise=True, name="other")
    assert model_config_differences(layout_only, run) == []
    old = {k: v for k, v in run.items() if k != "max_text_tokens"}  # written before the field existed
    assert model_config_differences(old, run) == []
    diffs = model_config_differences(dict(run, num_layers=2, params_dtype="bfloat16"), run)
    assert diffs == ["num_layers: checkpoint 2, run 4", "params_dtype: checkpoint 'bfloat16', run 'float32'"]
    assert model_config_differences(None, run) == ["meta.json has no model_config (got NoneType)"]


def test_resume_modes_refusals_and_pruning(tmp_path):
    results = spawn(resume_policy_worker, 2, tmp_path / "out", str(tmp_path / "ckpt"))
    assert sorted(results) == [0, 1]
    for rank, r in results.items():
        assert r["auto_empty"] is None and r["never_empty"] is None, rank
        assert "checkpoint.resume=required" in r["required_empty"] and "holds no checkpoint" in r["required_empty"]
        for key in ("auto_bad", "required_bad"):
            msg = r[key]
            assert "\n" not in msg and "none can be loaded" in msg and "Nothing was deleted" in msg, msg
            assert "step_00000002: checkpoint" in msg and "step_00000001: checkpoint" in msg, msg
            assert msg.count("sha256") == 2, msg
        for key in ("never_bad", "never_bad_load_false"):
            assert "checkpoint.resume=never" in r[key] and "step_00000002, step_00000001" in r[key], r[key]
            assert str(tmp_path / "ckpt" / "bad") in r[key] and "new checkpoint.dir" in r[key], r[key]
        assert r["bad_after"] == [1, 2], r  # nothing deleted
        assert "saved model config differs" in r["arch"] and "num_layers: checkpoint 2, run 4" in r["arch"], r["arch"]
        assert r["prune_before"] == [1, 2, 3, 4]
        assert r["fallback"] == 3 and len(r["fallback_refused"]) == 1 and "step_00000004" in r["fallback_refused"][0]
        assert r["prune_after"] == [1, 2, 3, 5, 6], r  # only this run's step 4 pruned
        assert len(r["set_aside"]) == 1 and r["set_aside"][0].startswith("step_00000004.replaced-"), r
        assert r["later_saved"] == [5, 6]


def test_async_save_is_committed_by_poll(tmp_path):
    results = spawn(async_poll_worker, 2, tmp_path / "out", str(tmp_path / "ckpt"), 60.0)
    for rank, r in results.items():
        assert r["committed_by_poll"] is not None and r["all_ranks"] == 2, r
        assert r["committed"] and not r["pending_after"], r
        assert r["loaded_step"] == 1 and r["equals_state_at_save"], r
        assert r["staged_on_host"], r


def _train(config: Path, timeout: int = 240):
    return subprocess.run(
        [sys.executable, "-m", "consumers.train", "--config", str(config)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_refuses_unloadable_checkpoint_with_one_line(tmp_path):
    """A 2-step run checkpoints; rerunning it with another architecture (auto) and with
    resume: never exits 2 with one line naming the checkpoint; the checkpoint is still there."""
    cache = write_cache(tmp_path / "cache", samples_per_bucket=4)
    cfg = run_config(cache, tmp_path, steps=2, ckpt_interval=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = _train(path)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg["model"]["num_layers"] = 3
    path.write_text(yaml.safe_dump(cfg))
    r = _train(path)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("qwenimage train:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "step_00000002: checkpoint" in lines[0] and "num_layers: checkpoint 2, run 3" in lines[0], lines[0]
    cfg["model"]["num_layers"] = 2
    cfg["checkpoint"]["resume"] = "never"
    path.write_text(yaml.safe_dump(cfg))
    r = _train(path)
    assert r.returncode == 2 and "checkpoint.resume=never" in r.stderr and "step_00000002" in r.stderr, r.stderr
    assert (tmp_path / "ckpt" / "step_00000002" / "COMMITTED").is_file()
