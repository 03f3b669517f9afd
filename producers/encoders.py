"""The two frozen encoders of Qwen-Image, loaded from a local HF-format directory.

Directory layout (the same as the Qwen/Qwen-Image(-Edit) repositories)::

    DIR/vae/            diffusers AutoencoderKLQwenImage (config.json + weights)
    DIR/text_encoder/   transformers Qwen2_5_VLForConditionalGeneration
    DIR/tokenizer/      Qwen2 tokenizer
    DIR/processor/      Qwen2-VL image processor config (edit samples); falls back to tokenizer/

Everything is loaded with ``from_pretrained(path)``, never from a hub. ``--encoders tiny`` builds
small random-initialised encoders with `build_tiny_encoders` (a real Qwen BPE tokenizer from
dashscope's ``qwen.tiktoken``, VAE z_dim 16 with 8x downsampling, text hidden size 32), saves
them to such a directory, and then loads them through exactly the same code.

Text conditioning follows docs/spec.md §5: the last hidden state, template prefix
(`drop_idx`, computed by tokenizing the prefix: 34 for T2I, 64 for edit with the real
vocabulary) dropped, at most `max_text_tokens` tokens, unpadded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_qwenimage.errors import UserError

T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
#: The system block and user header that are dropped from the conditioning (spec 5.4).
T2I_PREFIX = T2I_TEMPLATE.split("{}")[0]
EDIT_PREFIX = EDIT_TEMPLATE.split("<|vision_start|>")[0]
IMAGE_PAD = "<|image_pad|>"

#: Qwen2.5-VL special tokens in id order from 151643 (the Qwen BPE has 151643 ranks).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
TINY_FORMAT_VERSION = 1
TINY_TEXT_HIDDEN = 32
TINY_MARKER = "tiny_encoders.json"


class EncoderLoadError(UserError, RuntimeError):
    """The encoder directory is missing a part or holds something else; the message names it."""


def qwen_tiktoken_path() -> str:
    """Path of the real Qwen BPE ranks shipped inside the dashscope wheel.

    Found without importing dashscope (its ``__init__`` pulls in aiohttp, cryptography, ...), so
    the wheel alone, installed with ``--no-deps``, is enough (benchmarks/gpu/stage.sh stages it so).
    """
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - a dev dependency
        raise EncoderLoadError("tiny encoders need the Qwen BPE vocabulary from `pip install dashscope`")
    path = os.path.join(list(spec.submodule_search_locations)[0], "resources", "qwen.tiktoken")
    if not os.path.exists(path):
        raise EncoderLoadError(f"{path}: qwen.tiktoken not found in the installed dashscope wheel")
    return path


def default_tiny_dir() -> Path:
    base = os.environ.get("QWENIMAGE_TINY_ENCODERS_DIR")
    if base:
        return Path(base)
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return Path(cache) / "megatron-qwenimage" / f"tiny-encoders-v{TINY_FORMAT_VERSION}"


def build_tiny_encoders(
    directory: str | os.PathLike | None = None, seed: int = 0, vae_base_dim: int = 16, full_size: bool = False
) -> Path:
    """Create (once) small random-initialised encoders in HF format and return the directory.

    `vae_base_dim` widens the tiny VAE (benchmarks make encoding dominate with it); `full_size`
    builds the real architectures instead (VAE base_dim 96, Qwen2.5-VL-7B), random weights, for
    GPU benchmarks.

    Safe under concurrency: the directory is built privately and renamed into place; if another
    process got there first its copy is kept.
    """
    target = Path(directory) if directory is not None else default_tiny_dir()
    if (target / TINY_MARKER).exists():
        return target
    from diffusers import AutoencoderKLQwenImage
    from tokenizers import AddedToken  # noqa: F401  (transformers dependency)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        torch.manual_seed(seed)
        # VAE: 3 stride-2 stages (8x spatial, like the real VAE), z_dim 16, narrow channels.
        if full_size:
            vae = AutoencoderKLQwenImage()  # the released config (spec 4.2)
        else:
            vae = AutoencoderKLQwenImage(
                base_dim=vae_base_dim,
                z_dim=16,
                dim_mult=[1, 2, 2, 2],
                num_res_blocks=1,
                temperal_downsample=[False, True, True],
            )
        vae.save_pretrained(tmp / "vae")
        text_cfg = Qwen2_5_VLConfig(
            text_config=dict(
                hidden_size=TINY_TEXT_HIDDEN,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                rope_theta=1e6,
                vocab_size=152064,
                rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
            ),
            vision_config=dict(
                depth=2, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=TINY_TEXT_HIDDEN
            ),
            vocab_size=152064,
            vision_start_token_id=151652,
            vision_end_token_id=151653,
            image_token_id=151655,
            video_token_id=151656,
        )
        if full_size:  # Qwen2.5-VL-7B shapes (spec 5.1), random weights, bf16
            text_cfg = Qwen2_5_VLConfig(
                text_config=dict(
                    hidden_size=3584,
                    intermediate_size=18944,
                    num_hidden_layers=28,
                    num_attention_heads=28,
                    num_key_value_heads=4,
                    rope_theta=1e6,
                    vocab_size=152064,
                    rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
                ),
                vision_config=dict(
                    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584
                ),
                vocab_size=152064,
                vision_start_token_id=151652,
                vision_end_token_id=151653,
                image_token_id=151655,
                video_token_id=151656,
                torch_dtype="bfloat16",
            )
        with torch.device("cuda" if full_size and torch.cuda.is_available() else "cpu"):
            text_model = Qwen2_5_VLForConditionalGeneration(text_cfg)
        (text_model.to(torch.bfloat16) if full_size else text_model).eval().save_pretrained(tmp / "text_encoder")
        del text_model
        ranks = qwen_tiktoken_path()
        vocab, merges = TikTokenConverter(ranks).extract_vocab_merges_from_model(ranks)
        tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
        tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
        ids = tok.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS)
        if ids != list(range(151643, 151643 + len(QWEN_SPECIAL_TOKENS))):
            raise EncoderLoadError(f"special token ids {ids} do not follow Qwen2.5-VL's (151643...)")
        tok.save_pretrained(tmp / "tokenizer")
        Qwen2VLImageProcessorPil().save_pretrained(tmp / "processor")
        (tmp / TINY_MARKER).write_text(json.dumps({"version": TINY_FORMAT_VERSION, "seed": seed}))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / TINY_MARKER).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_encoders_dir(spec: str) -> Path:
    """``"tiny"`` -> the built tiny directory; anything else must be an existing directory."""
    if spec == "tiny":
        return build_tiny_encoders()
    path = Path(spec)
    for part in ("vae", "text_encoder", "tokenizer"):
        if not (path / part).is_dir():
            raise EncoderLoadError(
                f"encoders directory {path}: missing {part}/ (expected the Qwen-Image layout "
                "vae/, text_encoder/, tokenizer/ with HF-format weights, or 'tiny')"
            )
    return path


#: Weight files are hashed in chunks of this many bytes (constant memory, any file size).
HASH_CHUNK_BYTES = 8 << 20
#: Version of the digest sidecar's layout; a sidecar of another version is ignored and rewritten.
DIGEST_SIDECAR_VERSION = 1


def digest_sidecar_path(directory: str | os.PathLike) -> Path:
    """Where the file digests of the encoder `directory` are remembered between runs: one small JSON
    per directory under ``$XDG_CACHE_HOME/megatron-qwenimage/encoder-digests/`` (default
    ``~/.cache``), named by the directory's absolute path, so a read-only model directory works."""
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    key = hashlib.sha256(os.fsencode(os.path.abspath(directory))).hexdigest()[:32]
    return Path(cache) / "megatron-qwenimage" / "encoder-digests" / f"{key}.json"


def file_digest(path: Path) -> str:
    """SHA-256 (hex) of the file's bytes, read in `HASH_CHUNK_BYTES` chunks (~0.7 GB/s on one core)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> list[int]:
    """What must be unchanged for a remembered digest to stand: size (bytes), mtime and ctime (ns),
    inode. Any write to a file moves its ctime, which no user call can set back (unlike mtime)."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_sidecar(path: Path) -> dict[str, dict]:
    """The remembered ``{relative path: {"stat": [...], "sha256": hex}}``; empty when missing or unusable."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(d, dict) or d.get("version") != DIGEST_SIDECAR_VERSION or not isinstance(d.get("files"), dict):
        return {}
    return d["files"]


def _write_sidecar(path: Path, files: dict[str, dict]) -> None:
    """Replace the sidecar atomically; a cache directory that cannot be written only costs a re-hash."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": DIGEST_SIDECAR_VERSION, "files": files}, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def encoder_files(root: Path) -> list[Path]:
    """The files under `root` that make up the encoders, sorted: every file but `TINY_MARKER` and
    hidden ones (a name starting with ``.`` anywhere in the path, e.g. the ``.cache/huggingface/``
    download metadata that ``from_pretrained`` never reads)."""
    return [
        path
        for path in sorted(root.rglob("*"))
        if path.is_file()
        and path.name != TINY_MARKER
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]


def file_digests(directory: str | os.PathLike) -> dict[str, str]:
    """Relative path -> SHA-256 of the bytes of every file of `encoder_files(directory)`.

    Each digest is remembered in `digest_sidecar_path` under the file's `_stat_key`: a file whose
    size, mtime, ctime and inode are unchanged is not read again, so only the first run after the
    weights change pays for hashing them (about 25 s for the 16 GB of Qwen-Image's text encoder).
    """
    root = Path(directory)
    sidecar = digest_sidecar_path(root)
    remembered = _read_sidecar(sidecar)
    files: dict[str, dict] = {}
    for path in encoder_files(root):
        rel = path.relative_to(root).as_posix()
        key = _stat_key(path.stat())
        known = remembered.get(rel)
        if isinstance(known, dict) and known.get("stat") == key and isinstance(known.get("sha256"), str):
            files[rel] = known
        else:
            files[rel] = {"stat": key, "sha256": file_digest(path)}
    if files != remembered:
        _write_sidecar(sidecar, files)
    return {rel: entry["sha256"] for rel, entry in files.items()}


def encoder_version(directory: str | os.PathLike) -> str:
    """Short fingerprint (16 hex digits) of the encoders: the content of every file under
    `directory` (configs, tokenizer, every weight file, byte for byte) and the prompt templates.

    Each file enters as its relative path and the SHA-256 of its bytes (`file_digests`), so any
    changed tensor value changes the fingerprint, while the same files in another directory give
    the same one. Digests are remembered per file under its size, mtime, ctime and inode, so
    unchanged weights are hashed once, not on every run.
    """
    h = hashlib.sha256()
    for rel, digest in file_digests(directory).items():
        h.update(rel.encode() + b"\0" + digest.encode() + b"\0")
    h.update(T2I_TEMPLATE.encode() + EDIT_TEMPLATE.encode())
    return h.hexdigest()[:16]


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


#: The ``torch.compile`` backend of ``--vae-compile`` (default "inductor"). Tests set "eager" to
#: exercise TorchDynamo's capture of the encoder without inductor's code generation, which takes
#: about 20 s per input shape on a 2-core CPU.
VAE_COMPILE_BACKEND_ENV = "QWENIMAGE_VAE_COMPILE_BACKEND"


def to_channels_last(module: torch.nn.Module) -> None:
    """In place: every 5-D parameter and buffer to ``channels_last_3d``, every 4-D one to
    ``channels_last`` (``Module.to(memory_format=channels_last_3d)`` refuses the VAE's 2-D convs)."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.dim() == 5:
            t.data = t.data.contiguous(memory_format=torch.channels_last_3d)
        elif t.dim() == 4:
            t.data = t.data.contiguous(memory_format=torch.channels_last)


class SingleFrameConv(torch.nn.Module):
    """A causal 3-D convolution of the VAE (``QwenImageCausalConv3d``) applied to one frame, as a
    2-D convolution.

    The causal convolution pads k_t - 1 zero frames before its input, so for a one-frame input
    its single output frame meets data only through the kernel's last temporal tap: the result is
    ``conv2d(x[:, :, 0], weight[:, :, -1])`` with the spatial padding, k_t times fewer
    multiply-adds (3x for the VAE's 3x3x3 kernels), equal up to the order of summation.
    Takes and returns [B, C, 1, H, W]; refuses more frames or a temporal cache.
    """

    def __init__(self, conv: torch.nn.Conv3d) -> None:
        super().__init__()
        pad = conv._padding  # (w, w, h, h, front frames, back frames)
        self.weight = torch.nn.Parameter(conv.weight.detach()[:, :, -1].clone(), requires_grad=False)
        self.bias = None if conv.bias is None else torch.nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.stride, self.padding, self.groups = tuple(conv.stride[1:]), (pad[2], pad[0]), conv.groups

    @staticmethod
    def folds(conv: torch.nn.Module) -> bool:
        """Whether `conv` is a causal 3-D convolution whose one-frame output sees one frame only."""
        pad = getattr(conv, "_padding", None)
        return (
            isinstance(conv, torch.nn.Conv3d)
            and pad is not None
            and pad[4] == conv.kernel_size[0] - 1
            and pad[5] == 0
            and conv.stride[0] == 1
            and tuple(conv.dilation) == (1, 1, 1)
            and tuple(conv.padding) == (0, 0, 0)
            and pad[0] == pad[1]
            and pad[2] == pad[3]
        )

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        if cache_x is not None or x.shape[2] != 1:
            raise RuntimeError(f"SingleFrameConv: one frame without a temporal cache, got {tuple(x.shape)}")
        y = torch.nn.functional.conv2d(x[:, :, 0], self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        return y.unsqueeze(2)


def fold_single_frame_convs(module: torch.nn.Module) -> int:
    """In place: replace every `SingleFrameConv.folds` convolution below `module` by its
    `SingleFrameConv`; returns how many. The module then encodes single frames only."""
    folded = 0
    for name, child in list(module.named_children()):
        if SingleFrameConv.folds(child):
            setattr(module, name, SingleFrameConv(child))
            folded += 1
        else:
            folded += fold_single_frame_convs(child)
    return folded


def compile_kwargs(mode: str) -> dict:
    """``torch.compile`` keyword arguments of a `VAE_COMPILE_MODES` mode other than "off"."""
    backend = os.environ.get(VAE_COMPILE_BACKEND_ENV, "inductor")
    if backend != "inductor":  # the modes are inductor's
        return {"backend": backend}
    return {"backend": backend, "mode": None if mode == "default" else mode}


class VaeEncoder:
    """``AutoencoderKLQwenImage`` posterior mode, normalised with latents_mean/std, as bf16.

    `encode` takes uint8 images [B, H, W, 3] (H, W multiples of 16) and returns bf16
    [B, z_dim, H/8, W/8].

    An image is one frame, so the encoder runs once on [B, 3, 1, H, W] without diffusers' temporal
    feature cache (for a single frame the cache only holds copies; the result is bit-identical to
    ``encode(x).latent_dist.mode()``, tests/producers/test_vae_knobs.py). Speed knobs, off by
    default (`producers.config.check_vae_knobs` validates them):

    * `channels_last`: the model's weights and the input in channels_last_3d (2-D conv weights
      channels_last). Without it the input is already a channels-last view of the HWC pixels, so
      the first convolutions run channels-last and the rest channels-first.
    * `conv2d`: the encoder's causal 3-D convolutions run as 2-D convolutions over the one frame
      (`SingleFrameConv`: a third of their multiply-adds; `self.model` then encodes single frames
      only, without diffusers' ``encode``).
    * `compile_mode`: ``torch.compile`` the encoder's forward with this mode ("default",
      "reduce-overhead", ...; "off": eager). The first batch of each new shape compiles.

    Each changes the latents by float rounding only (CPU fp32: under 1e-6 on values of order 1).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        device: str | None = None,
        channels_last: bool = False,
        compile_mode: str = "off",
        conv2d: bool = False,
    ) -> None:
        from diffusers import AutoencoderKLQwenImage

        from producers.config import check_vae_knobs

        check_vae_knobs(channels_last, compile_mode, conv2d)
        self.device = pick_device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoencoderKLQwenImage.from_pretrained(Path(directory) / "vae", torch_dtype=self.dtype)
        self.model.to(self.device).eval()
        self.channels_last, self.compile_mode, self.conv2d = channels_last, compile_mode, conv2d
        if conv2d:
            fold_single_frame_convs(self.model.encoder)
            if SingleFrameConv.folds(self.model.quant_conv):
                self.model.quant_conv = SingleFrameConv(self.model.quant_conv)
        if channels_last:
            to_channels_last(self.model)
        if compile_mode != "off":
            self.model.encoder.compile(**compile_kwargs(compile_mode))
        cfg = self.model.config
        self.z_dim = int(cfg.z_dim)
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    def posterior_mode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, 1, H, W] in [-1, 1] (model dtype, on its device) -> [B, z_dim, 1, H/8, W/8]."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return self.model.quant_conv(self.model.encoder(x))[:, : self.z_dim]

    @torch.no_grad()
    def encode(self, images_uint8: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(self.device)
        x = x.permute(0, 3, 1, 2).to(self.dtype).div_(127.5).sub_(1.0).unsqueeze(2)  # [B, 3, 1, H, W] in [-1, 1]
        z = self.posterior_mode(x)[:, :, 0].float()  # [B, z, H/8, W/8]
        return ((z - self.mean) / self.std).to(torch.bfloat16).cpu()


@dataclass
class TextEncoding:
    """Unpadded text conditioning of one sample: bf16 [L, D] and whether it was truncated."""

    embedding: torch.Tensor
    truncated: bool
    num_tokens_before_truncation: int


class TextEncoder:
    """Qwen2.5-VL last hidden states with the template prefix dropped (spec section 5).

    * `encode_t2i(captions)`: T2I template, `drop_idx_t2i` tokens dropped.
    * `encode_edit(instruction, image)`: edit template with the condition image expanded to its
      vision tokens (what ``Qwen2_5_VLProcessor`` does: grid_t*grid_h*grid_w / merge_size^2
      ``<|image_pad|>`` tokens), `drop_idx_edit` tokens dropped.
    """

    def __init__(self, directory: str | os.PathLike, device: str | None = None, max_text_tokens: int = 1024) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        root = Path(directory)
        self.device = pick_device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        proc_dir = (
            root / "processor" if (root / "processor" / "preprocessor_config.json").exists() else root / "tokenizer"
        )
        self.image_processor = AutoImageProcessor.from_pretrained(proc_dir)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "text_encoder", torch_dtype=self.dtype)
        self.model.to(self.device).eval()
        self.max_text_tokens = max_text_tokens
        self.text_dim = int(self.model.config.text_config.hidden_size)
        self.drop_idx_t2i = len(self.tokenizer(T2I_PREFIX).input_ids)
        self.drop_idx_edit = len(self.tokenizer(EDIT_PREFIX).input_ids)

    def count_tokens(self, caption: str) -> int:
        """Conditioning tokens a T2I caption yields before truncation (template suffix included)."""
        return len(self.tokenizer(T2I_TEMPLATE.format(caption)).input_ids) - self.drop_idx_t2i

    def last_hidden_state(self, **inputs) -> torch.Tensor:
        """``[B, L, D]``: the language model's last hidden state (after its final norm), what
        ``output_hidden_states=True`` returns last, without the output layer: the 152k-entry
        vocabulary projection would cost a GEMM and a ``[B, L, 152k]`` logits tensor per batch
        that nothing reads."""
        return self.model.model(**inputs).last_hidden_state

    @torch.no_grad()
    def encode_t2i(self, captions: list[str]) -> list[TextEncoding]:
        texts = [T2I_TEMPLATE.format(c) for c in captions]
        full = [len(ids) - self.drop_idx_t2i for ids in self.tokenizer(texts).input_ids]
        enc = self.tokenizer(
            texts,
            max_length=self.max_text_tokens + self.drop_idx_t2i,
            truncation=True,
            padding=True,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.last_hidden_state(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        out = []
        for i, n in enumerate(full):
            valid = hidden[i][enc.attention_mask[i].bool()][self.drop_idx_t2i :]
            out.append(TextEncoding(valid.to(torch.bfloat16).cpu(), n > valid.shape[0], n))
        return out

    @torch.no_grad()
    def encode_edit(self, instruction: str, image_uint8: np.ndarray) -> TextEncoding:
        from PIL import Image

        vision = self.image_processor(images=[Image.fromarray(image_uint8)], return_tensors="pt")
        grid = vision["image_grid_thw"]
        n_pad = int(grid[0].prod()) // (self.image_processor.merge_size**2)
        text = EDIT_TEMPLATE.format(instruction).replace(IMAGE_PAD, IMAGE_PAD * n_pad)
        enc = self.tokenizer([text], return_tensors="pt").to(self.device)
        hidden = self.last_hidden_state(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            pixel_values=vision["pixel_values"].to(self.device, self.dtype),
            image_grid_thw=grid.to(self.device),
        )
        valid = hidden[0][self.drop_idx_edit :]
        n = int(valid.shape[0])
        valid = valid[: self.max_text_tokens]
        return TextEncoding(valid.to(torch.bfloat16).cpu(), n > valid.shape[0], n)
