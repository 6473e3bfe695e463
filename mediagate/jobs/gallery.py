"""An account's recent stored images: the gallery the console shows.

Images asked for as URLs are stored for the URL's lifetime; the gallery remembers which
were the account's (one state-store document per account, the newest ``GALLERY_KEEP``),
so ``GET /v1/images`` can sign fresh URLs for those still kept. Images returned inline
(``b64_json``) were never stored and are not in it. Pure functions over the document's
text, for ``JobStore.mutate``.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from pydantic import BaseModel, Field

GALLERY_DOCUMENT = "gallery"
GALLERY_KEEP = 200
PROMPT_KEPT_CHARS = 500  # enough to recognise a picture by; the rest is not stored


class GalleryEntry(BaseModel):
    """One stored image: its file, when and how it was made."""

    id: str = Field(description="The stored file's id (GET /v1/files/{id}/content).")
    created_at: float
    model: str
    prompt: str
    size: str
    kind: str = Field(description="image_generation or image_edit")


def _entries(text: str | None) -> list[GalleryEntry]:
    return [GalleryEntry.model_validate(item) for item in json.loads(text)] if text else []


def added(
    entries: list[GalleryEntry], kept_s: float, now: float
) -> Callable[[str | None], tuple[str | None, None]]:
    """The change that adds ``entries`` to a gallery document and drops what is older
    than ``kept_s`` (its files are deleted by then) or beyond ``GALLERY_KEEP``."""

    added_items = [entry.model_dump() for entry in entries]

    def change(text: str | None) -> tuple[str | None, None]:
        # Plain dicts here (on every stored image's path): validated when listed.
        current = [item for item in json.loads(text or "[]") if now - item["created_at"] < kept_s]
        return json.dumps([*current, *added_items][-GALLERY_KEEP:]), None

    return change


def listed(text: str | None, kept_s: float, now: float) -> list[GalleryEntry]:
    """The gallery's entries still kept, newest first."""
    kept = [entry for entry in _entries(text) if now - entry.created_at < kept_s]
    return sorted(kept, key=lambda entry: entry.created_at, reverse=True)
