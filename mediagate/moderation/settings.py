"""Which checkers run: plain data, part of the application's arguments."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ModerationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Check prompts, uploads and outputs.")
    prompt_terms_file: str | None = Field(
        None, description="YAML of terms per category; the shipped list if unset."
    )
    image_checker: str = Field(
        "nudenet",
        description="`nudenet` (its ONNX detector, shipped in its wheel), `none`, or "
        "`package.module:Class` of your own (constructed without arguments; see "
        "mediagate.moderation.images.ImageChecker).",
    )

    @property
    def checks_images(self) -> bool:
        """Whether images are checked (without loading the checker)."""
        return self.enabled and self.image_checker != "none"
