"""Synthetic text-rendering source: the report's "pure rendering" data for rare characters.

Sample i of seed s is fully determined by (s, i): a text (single or multi-line, Latin, digits,
and CJK when a CJK-capable font is installed), drawn with a bundled font (Pillow's built-in
FreeType font, or DejaVu/Noto where present) on a plain colour or a photo background (the
scikit-image sample photos when installed, else a smooth noise texture). The caption quotes the
rendered text exactly.
"""

from __future__ import annotations

import glob
import io
import os
import random
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from producers.items import InputItem, SourceError

URI_PREFIX = "synthetic:text/"
#: Kinds of ``synthetic:KIND?...`` inputs.
KINDS = ("text",)
_WORDS = [
    "Qwen",
    "Image",
    "render",
    "typography",
    "Megatron",
    "latent",
    "poster",
    "OPEN",
    "sale",
    "42",
    "2026",
    "café",
    "naïve",
    "Straße",
    "Ωmega",
    "data",
    "shard",
    "flow",
    "glyph",
    "kerning",
]
_CJK = ["通义千问", "图像生成", "你好世界", "文字渲染", "数据集", "日本語", "한국어"]
_CJK_FONT_GLOBS = [
    "/usr/share/fonts/**/*CJK*.tt[cf]",
    "/usr/share/fonts/**/*cjk*.tt[cf]",
    "/usr/share/fonts/**/wqy*.tt[cf]",
    "/usr/share/fonts/**/*Han*.otf",
]
_LATIN_FONT_GLOBS = ["/usr/share/fonts/**/DejaVuSans.ttf"]


@lru_cache(maxsize=None)
def cjk_font_path() -> str | None:
    for pattern in _CJK_FONT_GLOBS:
        found = sorted(glob.glob(pattern, recursive=True))
        if found:
            return found[0]
    return None


def _font(size: int, cjk: bool) -> ImageFont.FreeTypeFont:
    path = (
        cjk_font_path()
        if cjk
        else next((p for g in _LATIN_FONT_GLOBS for p in sorted(glob.glob(g, recursive=True))), None)
    )
    if path:
        return ImageFont.truetype(path, size)
    return ImageFont.load_default(size)  # Pillow's bundled FreeType font


def _sample_text(rng: random.Random) -> tuple[str, bool]:
    cjk = cjk_font_path() is not None and rng.random() < 0.3
    lines = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        if cjk:
            lines.append(rng.choice(_CJK))
        else:
            lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 3))))
    return "\n".join(lines), cjk


@lru_cache(maxsize=1)
def _photos() -> list[str]:
    try:
        import skimage

        d = os.path.join(os.path.dirname(skimage.__file__), "data")
        return sorted(glob.glob(os.path.join(d, "*.png")) + glob.glob(os.path.join(d, "*.jpg")))
    except ImportError:
        return []


def _background(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, str]:
    w, h = size
    if rng.random() < 0.5:
        colour = tuple(rng.randint(180, 255) for _ in range(3))
        return Image.new("RGB", size, colour), "a plain light background"
    photos = _photos()
    if photos:
        img = Image.open(photos[rng.randrange(len(photos))]).convert("RGB").resize(size)
        return img, "a photo background"
    noise = np.random.default_rng(rng.randrange(1 << 30)).random((h // 16 + 1, w // 16 + 1, 3))
    img = Image.fromarray((noise * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    return img, "a textured background"


def render(index: int, seed: int) -> tuple[bytes, str]:
    """PNG bytes and caption of synthetic sample `index` of `seed`."""
    rng = random.Random(seed * 1_000_003 + index)
    text, cjk = _sample_text(rng)
    size = rng.choice([(320, 320), (384, 288), (288, 384)])
    img, bg = _background(rng, size)
    draw = ImageDraw.Draw(img)
    font = _font(rng.randint(24, 40), cjk)
    colour = tuple(rng.randint(0, 60) for _ in range(3))
    box = draw.multiline_textbbox((0, 0), text, font=font)
    x = max(4, (size[0] - (box[2] - box[0])) // 2)
    y = max(4, (size[1] - (box[3] - box[1])) // 2)
    draw.multiline_text((x, y), text, font=font, fill=colour, align="center")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    quoted = text.replace("\n", " / ")
    caption = f'The text "{quoted}" written in dark letters on {bg}.'
    return buf.getvalue(), caption


def synthetic_items(kind: str, n: int, seed: int) -> Iterator[InputItem]:
    if kind not in KINDS:
        raise SourceError(
            f"synthetic:{kind}: unknown synthetic source; available: " + ", ".join(f"synthetic:{k}" for k in KINDS)
        )
    if n < 1:
        raise SourceError(f"synthetic:{kind}?n={n}: expected n >= 1 inputs")
    return _items(n, seed)


def _items(n: int, seed: int) -> Iterator[InputItem]:
    for i in range(n):
        _, caption = render(i, seed)
        yield InputItem(input_id=f"synthetic-text-{seed}-{i:07d}", image_uri=f"{URI_PREFIX}{seed}/{i}", caption=caption)


def read_synthetic(uri: str) -> bytes:
    seed, index = uri[len(URI_PREFIX) :].split("/")
    return render(int(index), int(seed))[0]
