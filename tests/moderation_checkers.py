"""An image checker for tests, plugged in by import path as an operator plugs their own
(``moderation.image_checker: tests.moderation_checkers:FlagsBrightRed``). Real
detectors cannot be made to flag anything here without shipping explicit images; this
one flags what the fake workers make on request (a solid colour from the seed)."""

from __future__ import annotations

from typing import Any

from mediagate.moderation.images import ImageVerdict
from mediagate.moderation.prompts import Level


class FlagsBrightRed:
    """Flags images whose average colour is bright red (red >= 200, green and blue
    < 60); at ``low`` only pure red (255, 0, 0)."""

    def __init__(self) -> None:
        self.checked = 0

    def check(self, images: list[Any], level: Level) -> list[ImageVerdict]:
        verdicts = []
        for image in images:
            self.checked += 1
            red, green, blue = (
                sum(channel) / len(channel)
                for channel in zip(*image.convert("RGB").getdata(), strict=True)
            )
            limit = 200 if level == "auto" else 255
            flagged = red >= limit and green < 60 and blue < 60
            verdicts.append(ImageVerdict(flagged, ("BRIGHT_RED",) if flagged else ()))
        return verdicts


class FlagsEverything:
    """Flags every image (a worker's output check, whatever the random weights make)."""

    def check(self, images: list[Any], level: Level) -> list[ImageVerdict]:
        return [ImageVerdict(True, ("EVERYTHING",)) for _ in images]
