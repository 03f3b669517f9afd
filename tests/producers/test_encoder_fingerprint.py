"""The encoder fingerprint (`producers.encoders.encoder_version`) covers the weights' content."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from producers import encoders
from producers.encoders import digest_sidecar_path, encoder_version


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch):
    """Digest sidecars under this test's temporary directory, not the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def make_encoders(root, scale: float = 1.0):
    """A minimal encoder directory: configs and one safetensors weight file per part."""
    for part in ("vae", "text_encoder"):
        (root / part).mkdir(parents=True)
        (root / part / "config.json").write_text('{"hidden_size": 8}')
        tensors = {"w": torch.arange(64, dtype=torch.float32).reshape(8, 8) * scale, "b": torch.zeros(8)}
        save_file(tensors, str(root / part / "model.safetensors"))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer_config.json").write_text("{}")
    return root


def change_one_value(path) -> None:
    """Rewrite one float32 of the safetensors file in place: same size, same names."""
    data = bytearray(path.read_bytes())
    data[-4:] = torch.tensor([123.5], dtype=torch.float32).numpy().tobytes()
    path.write_bytes(bytes(data))


def test_one_changed_tensor_value_changes_the_fingerprint(tmp_path):
    a = make_encoders(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert encoder_version(a) == encoder_version(b)  # same content elsewhere: the same version
    weights = b / "text_encoder" / "model.safetensors"
    size = weights.stat().st_size
    change_one_value(weights)
    assert weights.stat().st_size == size
    assert encoder_version(a) != encoder_version(b)


def test_a_file_rewritten_in_place_with_its_old_mtime_is_hashed_again(tmp_path, monkeypatch):
    """The remembered digest stands only while size, mtime, ctime and inode stand: a fine-tune saved
    over the old file, even with its mtime set back, is re-hashed (ctime moved)."""
    root = make_encoders(tmp_path / "enc")
    before = encoder_version(root)
    assert digest_sidecar_path(root).is_file()
    hashed = []
    real = encoders.file_digest
    monkeypatch.setattr(encoders, "file_digest", lambda path: hashed.append(path.name) or real(path))
    assert encoder_version(root) == before and hashed == []  # unchanged: nothing read again

    weights = root / "vae" / "model.safetensors"
    st = weights.stat()
    change_one_value(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_mtime_ns == st.st_mtime_ns and weights.stat().st_size == st.st_size
    assert encoder_version(root) != before and hashed == ["model.safetensors"]


def test_hidden_download_metadata_is_not_part_of_the_encoders(tmp_path):
    root = make_encoders(tmp_path / "enc")
    before = encoder_version(root)
    meta = root / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    (meta / "model.safetensors.metadata").write_text("etag and a download time")
    assert encoder_version(root) == before
