"""What a source lists: `InputItem` (one input before it is read) and `SourceError`.

Below every source (`producers.sources`, `producers.synthetic`, `producers.bundled`), which all
produce items and raise the error; it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_qwenimage.errors import UserError


class SourceError(UserError, ValueError):
    """The input cannot be listed at all (not a per-sample problem); the message names it."""


@dataclass
class InputItem:
    """One input sample, before reading.

    Attributes:
        input_id: stable id, unique within the source.
        image_uri: fsspec URL of the (target) image, or a ``tar://`` / ``synthetic:`` locator.
        caption: inline caption (str); None with `caption_uri` or when missing.
        caption_uri: fsspec URL of a caption file (sidecar); a missing file = missing caption.
        task: the cached sample kind (`megatron_qwenimage.cache.SAMPLE_KINDS`): "t2i" or "edit".
        condition_uri: edit source image; None for t2i.
        tar_member: (offset, size) of the image bytes inside `image_uri`'s tar (webdataset).
        caption_member: (offset, size) of the caption bytes inside `caption_uri`'s tar.
        label: what names the input in the cache (``source_uri``) and in messages when
            `image_uri` alone does not (``shard.tar#key``, ``manifest.jsonl#row=3``); None: `image_uri`.
        rejected: (reason, detail) when the listing already knows the input cannot be used: it
            is quarantined with that reason without being read.
    """

    input_id: str
    image_uri: str
    caption: str | None = None
    caption_uri: str | None = None
    task: str = "t2i"
    condition_uri: str | None = None
    tar_member: tuple[int, int] | None = None
    caption_member: tuple[int, int] | None = None
    label: str | None = None
    rejected: tuple[str, str] | None = None

    @property
    def source_uri(self) -> str:
        return self.label or self.image_uri

    def to_dict(self) -> dict:
        return dict(self.__dict__)
