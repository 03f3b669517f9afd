"""Bad input to ``qwenimage train``: one clear line, a non-zero exit, nothing lost.

Each bad run config, cache or path below is run through the command line in-process
(`megatron_qwenimage.cli.main`, one rank): the exit status is the error's, stderr holds exactly one
line ``qwenimage train: error: ...`` naming the key / file / flag, and the committed checkpoint
the run points at is byte-for-byte unchanged. One torchrun run with two ranks shows a layout error
reported once, by rank 0, with every rank exiting non-zero.
"""

from __future__ import annotations

import hashlib
import re
import socket
from pathlib import Path

import pytest
import yaml

from megatron_qwenimage import cli
from tests.helpers.consumers import run_config, run_train, single_rank_env, write_cache, write_run_config


def _tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` by relative path (directories included by name)."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
        for p in sorted(root.rglob("*"))
    }


def _train_in_process(config: Path, capsys) -> tuple[int, str, str]:
    with single_rank_env():
        rc = cli.main(["train", "--config", str(config)])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A cache and a checkpoint directory holding one committed checkpoint (step 2) of a 2-step run."""
    root = tmp_path_factory.mktemp("bad_input_train")
    cache = write_cache(root / "cache", samples_per_bucket=8)
    cfg = run_config(cache, root / "first", steps=2, ckpt_interval=2)
    cfg["checkpoint"]["dir"] = str(root / "ckpt")
    path = write_run_config(cfg, root / "first.yaml")
    with single_rank_env():
        assert cli.main(["train", "--config", str(path)]) == 0
    assert (root / "ckpt" / "step_00000002" / "COMMITTED").is_file()
    return {"cache": cache, "ckpt": root / "ckpt", "root": root}


def _base(trained, tmp_path) -> dict:
    """A 4-step run resuming from the committed checkpoint (auto), logging under `tmp_path`."""
    cfg = run_config(trained["cache"], tmp_path, steps=4, ckpt_interval=2)
    cfg["checkpoint"]["dir"] = str(trained["ckpt"])
    return cfg


def _set(section: str, key: str, value):
    def edit(cfg, tmp_path):
        cfg.setdefault(section, {})[key] = value

    return edit


def _replace(section: str, value):
    def edit(cfg, tmp_path):
        cfg[section] = value

    return edit


def _regular_file(section: str, key: str):
    def edit(cfg, tmp_path):
        f = tmp_path / f"{section}-is-a-file"
        f.write_text("not a directory\n")
        cfg[section][key] = str(f)

    return edit


def _missing_cache(cfg, tmp_path):
    cfg["data"]["caches"][0]["path"] = str(tmp_path / "no-such-cache")


#: (id, edit of the run-config mapping, exit status, substrings the one error line must hold)
CONFIG_CASES = [
    ("lr-not-a-number", _set("optimizer", "lr", "fast"), 2, ["optimizer.lr", "'fast'", "expected a number"]),
    ("train-steps-bool", _set("schedule", "train_steps", True), 2, ["schedule.train_steps", "boolean"]),
    ("seed-list", _set("schedule", "seed", [1, 2]), 2, ["schedule.seed", "a list"]),
    ("betas-scalar", _set("optimizer", "betas", 0.9), 2, ["optimizer.betas", "expected a list"]),
    ("checkpoint-interval-fraction", _set("checkpoint", "interval", 1.5), 2, ["checkpoint.interval=1.5"]),
    ("prometheus-port-word", _set("logging", "prometheus_port", "ninety"), 2, ["logging.prometheus_port"]),
    ("model-layers-word", _set("model", "num_layers", "two"), 2, ["model.num_layers", "'two'"]),
    ("model-norm-eps-word", _set("model", "norm_eps", "small"), 2, ["model.norm_eps"]),
    ("model-unknown-key", _set("model", "layers", 2), 2, ["model", "'layers'"]),
    ("tp-word", _set("parallel", "tp", "two"), 2, ["parallel.tp", "'two'"]),
    ("tp-zero", _set("parallel", "tp", 0), 2, ["parallel.tp=0"]),
    ("tp-world-mismatch", _set("parallel", "tp", 2), 2, ["world size 1", "parallel.tp"]),
    ("flow-high-word", _set("flow_matching", "high", "one"), 2, ["flow_matching.high", "'one'"]),
    ("parallel-not-mapping", _replace("parallel", 4), 2, ["parallel", "expected a mapping"]),
    ("schedule-not-mapping", _replace("schedule", "fast"), 2, ["schedule", "expected a mapping"]),
    ("data-not-mapping", _replace("data", ["cache"]), 2, ["data", "expected a mapping"]),
    ("checkpoint-missing-dir", _replace("checkpoint", {"interval": 2}), 2, ["checkpoint.dir", "required"]),
    (
        "latent-channels",
        lambda c, t: c["model"].update(out_channels=8, in_channels=32),
        2,
        ["model.in_channels=32", "model.patch_size=2", "model.out_channels=8", "16-channel latents", "cache 'cache'"],
    ),
    (
        "text-width",
        _set("model", "joint_attention_dim", 64),
        2,
        ["model.joint_attention_dim=64", "32-dim text embeddings", "cache 'cache'"],
    ),
    ("missing-cache", _missing_cache, 2, ["data.caches[0].path", "no-such-cache"]),
    (
        "checkpoint-dir-is-file",
        _regular_file("checkpoint", "dir"),
        2,
        ["checkpoint.dir", "checkpoint-is-a-file", "existing file"],
    ),
    ("logging-dir-is-file", _regular_file("logging", "dir"), 2, ["logging.dir", "logging-is-a-file", "existing file"]),
    ("cuda-graphs-scope", _set("cuda_graphs", "scope", "all"), 2, ["cuda_graphs.scope='all'", "'blocks'"]),
    (
        "cuda-graphs-recompute",
        lambda c, t: c.update(cuda_graphs={"scope": "blocks"}, recompute={"mode": "full"}),
        2,
        ["cuda_graphs.scope='blocks' refused", "recompute.mode='full'", "set recompute.mode: none"],
    ),
    (
        "cuda-graphs-without-cuda",
        _set("cuda_graphs", "scope", "blocks"),
        2,
        ["cuda_graphs.scope='blocks' refused", "no CUDA device"],
    ),
]


@pytest.mark.parametrize("edit,code,needles", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_run_config_is_one_line_and_keeps_checkpoints(trained, tmp_path, capsys, edit, code, needles):
    before = _tree_digest(trained["ckpt"])
    cfg = _base(trained, tmp_path)
    edit(cfg, tmp_path)
    path = write_run_config(cfg, tmp_path / "run.yaml")
    rc, out, err = _train_in_process(path, capsys)
    assert rc == code, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwenimage train: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert _tree_digest(trained["ckpt"]) == before
    assert not (tmp_path / "logs" / "metrics.jsonl").exists()  # failed before anything was logged


#: (id, YAML text or None for "no file", substrings of the error line; "{path}" is the file)
FILE_CASES = [
    ("empty-file", "", ["{path}", "empty"]),
    ("list-not-mapping", "- model\n- data\n", ["{path}", "expected a mapping of sections", "list"]),
    ("invalid-yaml", "model: tiny-16ch\nschedule: {train_steps: 2\ndata: [\n", ["{path}", "not valid YAML", "line 3"]),
    ("missing-file", None, ["--config", "{path}", "does not exist"]),
    ("scalar-document", "42\n", ["{path}", "expected a mapping of sections"]),
]


@pytest.mark.parametrize("text,needles", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_bad_run_config_file_is_one_line(tmp_path, capsys, text, needles):
    path = tmp_path / "run.yaml"
    if text is not None:
        path.write_text(text)
    rc, _, err = _train_in_process(path, capsys)
    assert rc == 2
    (line,) = err.splitlines()
    assert line.startswith("qwenimage train: error: ")
    for needle in needles:
        assert needle.format(path=path) in line, (needle, line)


def test_numeric_strings_become_numbers(tmp_path):
    """PyYAML reads ``1e-3`` (no dot) as a string: numeric fields take it as the number."""
    from consumers.train import RunConfig

    cfg = run_config(str(tmp_path / "cache"), tmp_path, steps=2, ckpt_interval=2)
    text = yaml.safe_dump(cfg).replace("lr: 0.001", "lr: 1e-3")
    text += "parallel: {tp: '1'}\n"
    path = tmp_path / "run.yaml"
    path.write_text(text.replace("train_steps: 2", "train_steps: 2e1").replace("parallel: {}\n", ""))
    assert "lr: 1e-3" in path.read_text()
    run = RunConfig.from_yaml(path)
    assert run.optimizer.lr == 1e-3 and isinstance(run.optimizer.lr, float)
    assert run.schedule.train_steps == 20 and isinstance(run.schedule.train_steps, int)
    assert run.parallel["tp"] == 1
    assert RunConfig.from_dict({**cfg, "model": {"name": "tiny-16ch", "norm_eps": "1e-5"}}).model.norm_eps == 1e-5


def test_prometheus_port_in_use_names_the_port(trained, tmp_path, capsys):
    """The exporter's port is taken: the error names the key and the port (not a bare Errno 98);
    the run resumed from the checkpoint before it failed and changed nothing there."""
    before = _tree_digest(trained["ckpt"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cfg = _base(trained, tmp_path)
        cfg["logging"]["prometheus_port"] = port
        path = write_run_config(cfg, tmp_path / "run.yaml")
        rc, _, err = _train_in_process(path, capsys)
    assert rc == 2
    (line,) = err.splitlines()
    assert line.startswith("qwenimage train: error: ")
    assert f"logging.prometheus_port={port}" in line and f"127.0.0.1:{port}" in line, line
    assert _tree_digest(trained["ckpt"]) == before


@pytest.mark.parametrize(
    "rank,collective,expected",
    [
        ("0", True, "qwenimage train: error: bad value"),
        ("1", True, None),
        ("1", False, "qwenimage train: error: [rank 1] bad value"),
    ],
)
def test_rank_reporting_policy(monkeypatch, capsys, rank, collective, expected):
    """Rank 0 reports every error; another rank only one it alone may have hit, prefixed."""
    from megatron_qwenimage.config import ConfigError
    from megatron_qwenimage.errors import mark_collective

    monkeypatch.setenv("RANK", rank)
    error = ConfigError("bad value")
    if collective:
        mark_collective(error)
    cli.report_user_error("train", error, as_json=False, debug=False)
    err = capsys.readouterr().err
    assert err.splitlines() == ([expected] if expected else [])


def test_torchrun_layout_error_is_one_line_from_rank_0(trained, tmp_path):
    """Two ranks, ``parallel.tp: 3``: both raise the same error; one line (rank 0), both exit 2."""
    before = _tree_digest(trained["ckpt"])
    cfg = _base(trained, tmp_path)
    cfg["parallel"] = {"tp": 3}
    r = run_train(write_run_config(cfg, tmp_path / "run.yaml"), nproc=2, timeout=240)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if "qwenimage train: error:" in x]
    assert len(lines) == 1 and lines[0].startswith("qwenimage train: error: "), r.stderr[-3000:]
    assert "world size 2" in lines[0] and "parallel.tp" in lines[0] and "[rank" not in lines[0]
    assert "ConfigError" not in r.stderr and "consumers/train.py" not in r.stderr, r.stderr[-3000:]
    # torchrun's own failure report lists the ranks' exit statuses: the first to fail exited 2
    # (torchrun may SIGTERM the other before it exits on its own); none succeeded.
    codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", r.stderr)]
    assert 2 in codes and 0 not in codes, r.stderr[-3000:]
    assert _tree_digest(trained["ckpt"]) == before
