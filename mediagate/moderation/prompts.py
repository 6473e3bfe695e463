"""The prompt check: categories of terms (``configs/moderation_terms.yaml`` as shipped),
matched as whole words after normalising the prompt. Pure functions over data."""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

Level = Literal["auto", "low"]
# digits and signs written for letters ("s3x", "p0rn", "$ex")
LOOK_ALIKES = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "@": "a", "$": "s"})


class TermCategory(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    block: Literal["always", "auto", "never"] = Field(
        description="always: at every level; auto: at `auto` only; never: a qualifier only."
    )
    with_: str | None = Field(None, alias="with", description="Also needs this category.")
    terms: tuple[str, ...] = Field(min_length=1)


class PromptTerms(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    categories: dict[str, TermCategory]

    def model_post_init(self, _: object) -> None:
        for name, category in self.categories.items():
            if category.with_ is not None and category.with_ not in self.categories:
                raise ValueError(f"category {name} needs unknown category {category.with_}")


def normalised(text: str) -> str:
    """Lower case, accents dropped, look-alike digits folded, runs of anything but
    letters made one space (so word boundaries are spaces)."""
    folded = unicodedata.normalize("NFKD", text.casefold())
    letters = "".join(c for c in folded if not unicodedata.combining(c)).translate(LOOK_ALIKES)
    return " " + re.sub(r"[^a-z]+", " ", letters).strip() + " "


def _matches(text: str, category: TermCategory) -> bool:
    return any(f" {normalised(term).strip()} " in text for term in category.terms)


def flagged_categories(prompt: str, terms: PromptTerms, level: Level) -> list[str]:
    """The categories ``prompt`` matches that are blocked at ``level``."""
    text = normalised(prompt)
    blocked = []
    for name, category in terms.categories.items():
        if category.block == "never" or (category.block == "auto" and level != "auto"):
            continue
        if category.with_ is not None and not _matches(text, terms.categories[category.with_]):
            continue
        if _matches(text, category):
            blocked.append(name)
    return blocked


@lru_cache(maxsize=8)
def load_prompt_terms(path: str | None = None) -> PromptTerms:
    """The terms of ``path``, or the shipped list."""
    if path is None:
        text = resources.files("mediagate.configs").joinpath("moderation_terms.yaml").read_text()
    else:
        text = Path(path).read_text()
    return PromptTerms.model_validate(yaml.safe_load(text))
