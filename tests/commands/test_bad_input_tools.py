"""Bad input to ``qwenimage model-info`` and ``qwenimage convert``: one clear line, exit 2, nothing lost.

Every case runs the command line in-process (`megatron_qwenimage.cli.main`) and checks the exit
status, that stderr is exactly one line ``qwenimage <command>: error: ...`` naming the input
(flag, file, tensor), and for ``convert`` that the source checkpoint is byte-for-byte unchanged
and no (partial) destination was left behind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_qwenimage import cli
from megatron_qwenimage.config import ConfigError, load_config
from megatron_qwenimage.convert import CONFIG_NAME, NATIVE_CONFIG_NAME, NATIVE_WEIGHTS_NAME, WEIGHTS_NAME


def _run(argv, capsys) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_error_line(err: str, command: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"qwenimage {command}: error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------ model-info
def _yaml_file(text: str):
    def make(tmp_path: Path) -> str:
        path = tmp_path / "model.yaml"
        path.write_text(text)
        return str(path)

    return make


#: (id, argv (callables get tmp_path), substrings of the error line; "{file}" is the YAML file)
MODEL_INFO_CASES = [
    ("pp-7-20b", ["--pp", "7"], ["--pp 7", "num_layers=60", "pp*vpp"]),
    ("pp-3-tiny", ["--config", "tiny", "--pp", "3"], ["--pp 3", "pipeline stages"]),
    ("tp-5", ["--tp", "5"], ["--tp 5", "parallel.tp=5", "num_attention_heads=24"]),
    ("dp-0", ["--dp", "0"], ["--dp 0", "parallel.dp=0"]),
    ("micro-batch-0", ["--micro-batch", "0"], ["--micro-batch=0"]),
    ("height-1000", ["--height", "1000"], ["height=1000"]),
    ("text-tokens-negative", ["--text-tokens", "-1"], ["--text-tokens=-1"]),
    ("missing-config-file", ["--config", "/no/such/model.yaml"], ["/no/such/model.yaml", "does not exist"]),
    ("invalid-yaml", ["--config", _yaml_file("num_layers: 2\nheads: [1, 2\n")], ["{file}", "not valid YAML", "line 3"]),
    ("empty-yaml", ["--config", _yaml_file("")], ["{file}", "empty"]),
    ("yaml-list", ["--config", _yaml_file("- 1\n- 2\n")], ["{file}", "expected a mapping"]),
    ("norm-eps-word", ["--config", _yaml_file("num_layers: 2\nnorm_eps: tiny\n")], ["MMDiTConfig.norm_eps", "'tiny'"]),
    ("layers-bool", ["--config", _yaml_file("num_layers: yes\n")], ["MMDiTConfig.num_layers", "boolean"]),
]


@pytest.mark.parametrize("argv,needles", [c[1:] for c in MODEL_INFO_CASES], ids=[c[0] for c in MODEL_INFO_CASES])
@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_model_info_bad_input_is_one_line(tmp_path, capsys, argv, needles, as_json):
    argv = [a(tmp_path) if callable(a) else a for a in argv]
    file = next((a for a in argv if a.endswith(".yaml")), "")
    rc, out, err = _run(["model-info", *argv, *(["--json"] if as_json else [])], capsys)
    assert rc == 2
    line = _one_error_line(err, "model-info")
    for needle in needles:
        assert needle.format(file=file) in line, (needle, line)
    if as_json:  # the error object is the only JSON document on stdout, no estimate
        assert json.loads(out)["error"] == line.removeprefix("qwenimage model-info: error: ")
    else:
        assert out == ""


@pytest.mark.parametrize("tp,pp,dp", [(5, 1, 1), (1, 7, 1), (1, 8, 1), (16, 1, 1), (1, 2, 1), (4, 1, 2), (8, 2, 3)])
def test_model_info_refuses_exactly_what_training_refuses(capsys, tp, pp, dp):
    """The layout check is training's own (`RunConfig.layout`): same verdict, same message."""
    from consumers.train import RunConfig

    run = RunConfig(
        model=load_config("qwen-image-20b"),
        parallel={"tp": tp, "pp": pp},
        optimizer=None,
        data_parallel=None,
        precision=None,
        recompute=None,
        cuda_graphs=None,
        flow_matching={},
        data=None,
        schedule=None,
        checkpoint=None,
        logging=None,
    )
    try:
        run.layout(tp * pp * dp)
        train_error = None
    except ConfigError as exc:
        train_error = str(exc)
    rc, out, err = _run(["model-info", "--tp", str(tp), "--pp", str(pp), "--dp", str(dp), "--json"], capsys)
    if train_error is None:
        assert rc == 0 and json.loads(out)["layout"]["pp"] == pp, err
    else:
        assert rc == 2 and train_error in _one_error_line(err, "model-info")


# ------------------------------------------------------------------------------------ convert
def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def native_dir(tiny_diffusers_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("native") / "native"
    assert cli.main(["convert", str(tiny_diffusers_dir), str(path)]) == 0
    return path


def _edit_weights(weights: str, edit):
    def make(src: Path):
        state = load_file(str(src / weights))
        edit(state)
        save_file(state, str(src / weights))

    return make


def _int32(name: str):
    def edit(state):
        state[name] = state[name].to(torch.int32)

    return edit


def _wrong_shape(name: str):
    def edit(state):
        state[name] = torch.zeros(state[name].shape[0], state[name].shape[-1] + 1)

    return edit


def _write(rel: str, data: bytes):
    def make(src: Path):
        (src / rel).write_bytes(data)

    return make


def _remove(rel: str):
    def make(src: Path):
        (src / rel).unlink()

    return make


def _edit_json(rel: str, **fields):
    def make(src: Path):
        data = json.loads((src / rel).read_text())
        data.update(fields)
        (src / rel).write_text(json.dumps(data))

    return make


#: (id, source format, edit of a copy of the source, substrings; "{src}" is the source directory)
CONVERT_CASES = [
    (
        "int32-weight",
        "diffusers",
        _edit_weights(WEIGHTS_NAME, _int32("transformer_blocks.0.attn.to_q.weight")),
        ["transformer_blocks.0.attn.to_q.weight (int32)", "floating-point"],
    ),
    (
        "int64-native",
        "native",
        _edit_weights(NATIVE_WEIGHTS_NAME, lambda s: s.update({"proj_out.bias": s["proj_out.bias"].to(torch.int64)})),
        ["proj_out.bias (int64)"],
    ),
    (
        "wrong-shape",
        "diffusers",
        _edit_weights(WEIGHTS_NAME, _wrong_shape("img_in.weight")),
        ["img_in.weight: expected (64, 16), found (64, 17)"],
    ),
    (
        "wrong-shape-native",
        "native",
        _edit_weights(NATIVE_WEIGHTS_NAME, _wrong_shape("txt_in.weight")),
        ["{src}", "txt_in.weight: expected"],
    ),
    ("no-weights", "diffusers", _remove(WEIGHTS_NAME), ["{src}", f"no {WEIGHTS_NAME}"]),
    (
        "not-safetensors",
        "diffusers",
        _write(WEIGHTS_NAME, b"this is not a safetensors file"),
        ["{src}/" + WEIGHTS_NAME, "not a readable safetensors file"],
    ),
    ("config-not-json", "diffusers", _write(CONFIG_NAME, b"{not json"), ["{src}/" + CONFIG_NAME, "JSON"]),
    (
        "other-architecture",
        "diffusers",
        _edit_json(CONFIG_NAME, _class_name="FluxTransformer2DModel"),
        ["{src}/" + CONFIG_NAME, "FluxTransformer2DModel"],
    ),
    (
        "bad-config-value",
        "diffusers",
        _edit_json(CONFIG_NAME, num_layers="many"),
        ["{src}/" + CONFIG_NAME, "num_layers='many'"],
    ),
    (
        "native-config-foreign",
        "native",
        _edit_json(NATIVE_CONFIG_NAME, format="something-else"),
        ["{src}/" + NATIVE_CONFIG_NAME, "not a megatron-qwenimage checkpoint config"],
    ),
    (
        "not-a-checkpoint",
        "diffusers",
        lambda src: [p.unlink() for p in list(src.iterdir())],
        ["{src}", "neither config.json"],
    ),
]


@pytest.mark.parametrize("fmt,edit,needles", [c[1:] for c in CONVERT_CASES], ids=[c[0] for c in CONVERT_CASES])
def test_convert_bad_source_is_one_line_and_writes_nothing(
    tiny_diffusers_dir, native_dir, tmp_path, capsys, fmt, edit, needles
):
    src = tmp_path / "src"
    shutil.copytree(tiny_diffusers_dir if fmt == "diffusers" else native_dir, src)
    edit(src)
    before = _digest(src)
    dst = tmp_path / "out"
    rc, _, err = _run(["convert", str(src), str(dst)], capsys)
    assert rc == 2
    line = _one_error_line(err, "convert")
    for needle in needles:
        assert needle.format(src=src) in line, (needle, line)
    assert _digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no destination, no temporary left


@pytest.mark.parametrize("case", ["missing-source", "source-is-file", "destination-is-file", "destination-not-empty"])
def test_convert_bad_paths_are_named(tiny_diffusers_dir, tmp_path, capsys, case):
    src, dst = tiny_diffusers_dir, tmp_path / "out"
    before = _digest(tiny_diffusers_dir)
    if case == "missing-source":
        src = tmp_path / "nowhere"
    elif case == "source-is-file":
        src = tmp_path / "file.safetensors"
        src.write_bytes(b"x")
    elif case == "destination-is-file":
        dst.write_text("keep me\n")
    else:
        dst.mkdir()
        (dst / "model.safetensors").write_text("an earlier checkpoint\n")
    kept = _digest(tmp_path)
    rc, _, err = _run(["convert", str(src), str(dst)], capsys)
    assert rc == 2
    line = _one_error_line(err, "convert")
    assert str(src if case in ("missing-source", "source-is-file") else dst) in line, line
    assert _digest(tiny_diffusers_dir) == before and _digest(tmp_path) == kept


def test_convert_into_an_empty_directory_still_works(tiny_diffusers_dir, tmp_path, capsys):
    """The staged write is renamed onto an existing empty destination."""
    dst = tmp_path / "out"
    dst.mkdir()
    rc, _, err = _run(["convert", str(tiny_diffusers_dir), str(dst), "--json"], capsys)
    assert rc == 0, err
    assert (dst / NATIVE_WEIGHTS_NAME).is_file() and (dst / NATIVE_CONFIG_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
