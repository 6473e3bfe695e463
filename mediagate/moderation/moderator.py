"""What the router (and a video worker) asks of moderation: the level a request gets
within its tier's terms, and the checks, each refusing with ``ModerationBlocked`` (a
400 whose code is ``moderation_blocked``; nothing is charged for it)."""

from __future__ import annotations

import logging
from typing import Any

from mediagate.moderation.images import ImageChecker, load_image_checker
from mediagate.moderation.prompts import Level, PromptTerms, flagged_categories, load_prompt_terms
from mediagate.moderation.settings import ModerationSettings
from mediagate.protocol.errors import InvalidRequest, ModerationBlocked

logger = logging.getLogger(__name__)

REFUSED = "your request was rejected by the safety system"


def moderation_level(
    tier_name: str, default: Level, allow_low: bool, requested: Level | None
) -> Level:
    """The level of a request: what it asked for, within its tier's terms."""
    if requested is None:
        return default
    if requested == "low" and not allow_low:
        raise InvalidRequest(
            f"`moderation: low` is not available on the {tier_name} tier",
            param="moderation",
            code="moderation_level_not_allowed",
        )
    return requested


class Moderator:
    """The prompt check and the image check of one process."""

    def __init__(
        self,
        settings: ModerationSettings,
        *,
        terms: PromptTerms | None = None,
        image_checker: ImageChecker | None = None,
    ) -> None:
        self.settings = settings
        self.terms = terms or load_prompt_terms(settings.prompt_terms_file)
        self.image_checker = (
            image_checker
            if image_checker is not None or not settings.enabled
            else load_image_checker(settings.image_checker)
        )

    @property
    def checks_images(self) -> bool:
        """Whether image checks run (callers skip preparing images for them if not)."""
        return self.settings.enabled and self.image_checker is not None

    def check_prompt(self, prompt: str, level: Level) -> None:
        if not self.settings.enabled:
            return
        categories = flagged_categories(prompt, self.terms, level)
        if categories:
            logger.info("prompt refused (%s, level %s)", ", ".join(categories), level)
            raise ModerationBlocked(
                f"{REFUSED}: the prompt is not allowed ({', '.join(categories)})",
                param="prompt",
            )

    def check_images(self, images: list[Any], level: Level, *, param: str | None) -> None:
        """Refuse if any of ``images`` (PIL) is flagged; ``param`` names an upload."""
        labels = self.flagged_labels(images, level)
        if labels:
            raise refusal(labels, level, param=param)

    def flagged_labels(self, images: list[Any], level: Level) -> tuple[str, ...]:
        """What the checker found in ``images`` (PIL) at ``level``: empty if nothing."""
        if not self.checks_images or not images:
            return ()
        assert self.image_checker is not None  # (checks_images)
        flagged = [v for v in self.image_checker.check(images, level) if v.flagged]
        # (a checker of your own may flag without naming why)
        return tuple(sorted({label for v in flagged for label in v.labels or ("unnamed",)}))

    def check_frames(self, frames: Any, level: Level) -> None:
        """A video's frames (uint8, F x H x W x 3): its first, middle and last checked."""
        if not self.checks_images or not len(frames):
            return
        from PIL import Image

        picks = sorted({0, len(frames) // 2, len(frames) - 1})
        self.check_images([Image.fromarray(frames[index]) for index in picks], level, param=None)


def refusal(labels: tuple[str, ...], level: Level, *, param: str | None) -> ModerationBlocked:
    """The refusal of flagged images (``labels`` are logged, never shown); ``param``
    names an upload, None a generated image."""
    logger.info("image refused (%s, level %s)", ", ".join(labels), level)
    what = "the uploaded image is" if param else "the generated image was"
    return ModerationBlocked(f"{REFUSED}: {what} not allowed", param=param)
