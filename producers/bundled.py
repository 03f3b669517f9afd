"""The bundled demo input: real photos, text renders and edit pairs, written as one manifest.

`write_bundled_inputs` materialises, under a directory, everything `qwenimage run` feeds the
producers on a machine without datasets:

* **photos**: scikit-image's sample photographs (they ship inside its wheel) with a hand-written
  caption each (t2i);
* **text renders**: `producers.synthetic.render` images (text drawn with the bundled font on
  plain or photo backgrounds), captioned with the exact text (t2i);
* **edit pairs**: a photo and a deterministic edit of it (mirrored, grey, inverted, rotated,
  blurred, posterised) with the instruction that describes the edit (edit task: the source
  photo is the condition image, the edited photo the target).

The manifest (``manifest.jsonl``: ``image``, ``caption`` and, for edits, ``source_image``, paths
relative to the manifest) is the same file format a user's own manifest uses, so the producers
read it through the ordinary manifest source. Writing is deterministic and idempotent: a rerun
rewrites identical bytes, so the inputs keep their ids and a resumed run skips what it committed.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageFilter, ImageOps

from producers.items import SourceError

MANIFEST = "manifest.jsonl"

#: scikit-image sample photos used as real t2i data, with their captions.
PHOTO_CAPTIONS: dict[str, str] = {
    "astronaut.png": "Portrait of astronaut Eileen Collins in an orange flight suit in front of the American flag",
    "chelsea.png": "A tabby cat named Chelsea looking up, close-up of its face and whiskers",
    "coffee.png": "A cup of coffee with latte art on a saucer, seen from above on a wooden table",
    "motorcycle_left.png": "A red and black sport motorcycle parked in a studio, seen from the left camera",
    "rocket.jpg": "A rocket standing on its launch pad under a clear blue sky",
    "hubble_deep_field.jpg": "The Hubble deep field: thousands of distant galaxies on black space",
    "retina.jpg": "A colour photograph of a human retina with the optic disc and blood vessels",
    "ihc.png": "Immunohistochemistry microscope image of tissue stained brown and blue",
    "color.png": "A colour wheel test chart with saturated hues",
    "horse.png": "Silhouette of a horse standing, black on white",
    "camera.png": "Black and white photo of a cameraman with a tripod camera on a lawn",
    "coins.png": "Greek coins laid out in rows on a dark background, black and white photo",
    "moon.png": "The surface of the moon with craters, black and white photo",
    "page.png": "A scanned page of printed text with uneven lighting",
}

#: Edit instructions and the functions that perform them (PIL RGB in, PIL RGB out).
EDITS: tuple[tuple[str, Callable[[Image.Image], Image.Image]], ...] = (
    ("Mirror the picture horizontally", ImageOps.mirror),
    ("Make the photo black and white", lambda im: ImageOps.grayscale(im).convert("RGB")),
    ("Invert the colours of the image", ImageOps.invert),
    ("Rotate the picture by 90 degrees clockwise", lambda im: im.rotate(-90, expand=True)),
    ("Blur the whole image", lambda im: im.filter(ImageFilter.GaussianBlur(4))),
    ("Reduce the image to a few flat colours, like a poster", lambda im: ImageOps.posterize(im, 2)),
)
#: Photos the edit pairs start from (colour photos, so every edit is visible).
EDIT_SOURCES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "color.png")


def skimage_data_dir() -> Path:
    """scikit-image's bundled sample-data folder (raises a SourceError naming the package if absent)."""
    try:
        import skimage
    except ImportError:
        raise SourceError("the bundled inputs need scikit-image's sample photos: pip install scikit-image") from None
    return Path(skimage.__file__).parent / "data"


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomic write that leaves an identical file untouched (reruns keep mtimes and inputs)."""
    if path.exists() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_bundled_inputs(
    directory: str | os.PathLike, *, text_renders: int = 24, edit_pairs: int = 6, seed: int = 0
) -> str:
    """Write the bundled demo input into `directory`; returns the manifest's path.

    Args:
        text_renders: number of synthetic text renders (>= 0).
        edit_pairs: number of edit pairs (0 .. len(EDITS) * len(EDIT_SOURCES)).
        seed: seed of the text renders.
    """
    from producers.synthetic import render

    if not isinstance(text_renders, int) or isinstance(text_renders, bool) or text_renders < 0:
        raise SourceError(f"text_renders={text_renders!r}: expected a whole number >= 0")
    max_edits = len(EDITS) * len(EDIT_SOURCES)
    if not isinstance(edit_pairs, int) or isinstance(edit_pairs, bool) or not 0 <= edit_pairs <= max_edits:
        raise SourceError(f"edit_pairs={edit_pairs!r}: expected a whole number 0..{max_edits}")
    root = Path(directory)
    for sub in ("photos", "text", "edit"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    data = skimage_data_dir()
    rows: list[dict] = []
    for name, caption in PHOTO_CAPTIONS.items():
        src = data / name
        if not src.exists():
            continue  # an older scikit-image without this sample
        _write_if_changed(root / "photos" / name, src.read_bytes())
        rows.append({"image": f"photos/{name}", "caption": caption})
    for i in range(text_renders):
        png, caption = render(i, seed)
        _write_if_changed(root / "text" / f"render_{i:04d}.png", png)
        rows.append({"image": f"text/render_{i:04d}.png", "caption": caption})
    for i in range(edit_pairs):
        instruction, edit = EDITS[i % len(EDITS)]
        name = EDIT_SOURCES[(i // len(EDITS) + i) % len(EDIT_SOURCES)]
        source = Image.open(data / name).convert("RGB")
        stem = Path(name).stem
        _write_if_changed(root / "edit" / f"{i:03d}_{stem}_source.png", _png(source))
        _write_if_changed(root / "edit" / f"{i:03d}_{stem}_target.png", _png(edit(source)))
        rows.append(
            {
                "image": f"edit/{i:03d}_{stem}_target.png",
                "source_image": f"edit/{i:03d}_{stem}_source.png",
                "caption": instruction,
            }
        )
    manifest = root / MANIFEST
    _write_if_changed(manifest, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
    return str(manifest)
