"""Import/export with diffusers, the native format, `qwenimage convert`, and checkpoint errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_qwenimage import QwenImageMMDiT, load_config
from megatron_qwenimage.cli import main as cli_main
from megatron_qwenimage.convert import (
    INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    SafetensorsDirSource,
    load_diffusers,
    load_native,
    save_diffusers,
    save_native,
)
from tests.helpers.mmdit import make_inputs, model_kwargs


def _diffusers_tensors(directory):
    source = SafetensorsDirSource(directory)
    return {n: source.read(n) for n in source.names()}


def _model_tensors(model):
    return {n: t.detach().clone() for n, t in model.named_model_tensors()}


def _assert_same(a: dict, b: dict):
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_export_then_import_is_bit_exact(tiny_diffusers_dir, tmp_path):
    model = load_diffusers(tiny_diffusers_dir)
    save_diffusers(model, tmp_path / "exported")
    # The exported directory holds exactly the original diffusers tensors ...
    _assert_same(_diffusers_tensors(tmp_path / "exported"), _diffusers_tensors(tiny_diffusers_dir))
    # ... and importing it again gives back every tensor of the model, carried buffers included.
    _assert_same(_model_tensors(load_diffusers(tmp_path / "exported")), _model_tensors(model))


def test_diffusers_loads_export_of_a_fresh_model(tmp_path):
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageMMDiT(load_config("tiny"), init_seed=7)
    with torch.no_grad():  # adaLN-Zero init makes blocks identities; perturb so every weight matters
        for t in model.parameters():
            t.add_(0.05 * torch.randn_like(t))
    save_diffusers(model, tmp_path / "fresh")
    reference = QwenImageTransformer2DModel.from_pretrained(tmp_path / "fresh")
    inputs = make_inputs("edit_one_condition", 16, 16)
    n_target = inputs["loss_weights"].shape[1]
    with torch.no_grad():
        want = reference(**model_kwargs(inputs), return_dict=False)[0][:, :n_target]
        got = model(**model_kwargs(inputs))
    assert (got - want).abs().max().item() <= 1e-5


def test_sharded_export_with_index_loads_in_both(tiny_diffusers_dir, tmp_path):
    from diffusers import QwenImageTransformer2DModel

    model = load_diffusers(tiny_diffusers_dir)
    save_diffusers(model, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "sharded" / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "sharded" / WEIGHTS_NAME).exists()
    _assert_same(_model_tensors(load_diffusers(tmp_path / "sharded")), _model_tensors(model))
    reference = QwenImageTransformer2DModel.from_pretrained(tmp_path / "sharded")
    want = {n: p.detach() for n, p in reference.state_dict().items()}
    _assert_same(want, _diffusers_tensors(tiny_diffusers_dir))


def test_convert_cli_round_trip_through_native(tiny_diffusers_dir, tmp_path, capsys):
    native, back = tmp_path / "native", tmp_path / "back"
    assert cli_main(["convert", str(tiny_diffusers_dir), str(native), "--max-shard-size", "100KB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["format"] == "native"
    assert cli_main(["convert", str(native), str(back)]) == 0
    _assert_same(_diffusers_tensors(back), _diffusers_tensors(tiny_diffusers_dir))
    from_native = load_native(native)
    _assert_same(_model_tensors(from_native), _model_tensors(load_diffusers(tiny_diffusers_dir)))


def test_convert_cli_casts_and_refuses_to_overwrite(tiny_diffusers_dir, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert cli_main(["convert", str(tiny_diffusers_dir), str(out), "--to", "diffusers", "--dtype", "bf16"]) == 0
    assert all(t.dtype == torch.bfloat16 for t in _diffusers_tensors(out).values())
    assert cli_main(["convert", str(tiny_diffusers_dir), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "not a directory" in capsys.readouterr().err


def _corrupt_copy(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    state = load_file(str(dst / WEIGHTS_NAME))
    edit(state)
    save_file(state, str(dst / WEIGHTS_NAME))
    return dst


def test_checkpoint_missing_tensor_is_named(tiny_diffusers_dir, tmp_path):
    bad = _corrupt_copy(tiny_diffusers_dir, tmp_path / "bad", lambda s: s.pop("transformer_blocks.1.attn.to_k.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): transformer_blocks\.1\.attn\.to_k\.bias"):
        load_diffusers(bad)


def test_checkpoint_wrong_shape_and_extra_tensor_are_named(tiny_diffusers_dir, tmp_path):
    def edit(state):
        state["img_in.weight"] = torch.zeros(64, 17)
        state["transformer_blocks.0.surprise"] = torch.zeros(3)

    bad = _corrupt_copy(tiny_diffusers_dir, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as err:
        load_diffusers(bad)
    assert "img_in.weight: expected (64, 16), found (64, 17)" in str(err.value)
    assert "unexpected tensor(s): transformer_blocks.0.surprise" in str(err.value)


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(CheckpointError, match="neither config.json"):
        load_diffusers(tmp_path)


def test_native_checkpoint_errors_and_stage_loading(tiny_diffusers_dir, tmp_path):
    from megatron_qwenimage.convert import NATIVE_WEIGHTS_NAME

    model = load_diffusers(tiny_diffusers_dir)
    save_native(model, tmp_path / "native")
    # A pipeline stage reads its own tensors out of the whole-model checkpoint.
    stage = load_native(tmp_path / "native", pre_process=False, layer_range=(1, 3))
    whole = _model_tensors(model)
    for name, tensor in _model_tensors(stage).items():
        assert torch.equal(tensor, whole[name]), name
    # A missing and a mis-shaped tensor are both named.
    state = load_file(str(tmp_path / "native" / NATIVE_WEIGHTS_NAME))
    state.pop("blocks.2.img_qkv.weight")
    state["proj_out.bias"] = torch.zeros(3)
    save_file(state, str(tmp_path / "native" / NATIVE_WEIGHTS_NAME))
    with pytest.raises(CheckpointError) as err:
        load_native(tmp_path / "native")
    assert "missing tensor(s): blocks.2.img_qkv.weight" in str(err.value)
    assert "proj_out.bias: expected (16,), found (3,)" in str(err.value)
    with pytest.raises(CheckpointError, match="a native checkpoint; use megatron_qwenimage.convert.load_native"):
        load_diffusers(tmp_path / "native")
