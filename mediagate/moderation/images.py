"""The image check, for uploads and outputs: a pluggable ``ImageChecker``. The shipped
one is NudeNet's detector (an ONNX model inside its wheel: nothing is downloaded),
run on the CPU; its decision at each level is a pure function of its detections."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mediagate.moderation.prompts import Level

# NudeNet's labels: what `auto` refuses, and what even `low` does; a detection counts
# from the score given.
AUTO_BLOCKED = {
    "FEMALE_BREAST_EXPOSED": 0.45,
    "FEMALE_GENITALIA_EXPOSED": 0.4,
    "MALE_GENITALIA_EXPOSED": 0.4,
    "BUTTOCKS_EXPOSED": 0.5,
    "ANUS_EXPOSED": 0.4,
}
LOW_BLOCKED = {
    "FEMALE_GENITALIA_EXPOSED": 0.6,
    "MALE_GENITALIA_EXPOSED": 0.6,
    "ANUS_EXPOSED": 0.6,
}


@dataclass(frozen=True)
class ImageVerdict:
    flagged: bool
    labels: tuple[str, ...] = ()  # what was found (for logs and metrics, never shown)


class ImageChecker(Protocol):
    """Judges images (PIL, RGB) at a moderation level, one verdict each."""

    def check(self, images: list[Any], level: Level) -> list[ImageVerdict]: ...


def verdict_of(detections: list[dict[str, Any]], level: Level) -> ImageVerdict:
    """NudeNet detections (``{"class", "score", "box"}``) judged at ``level``."""
    limits = AUTO_BLOCKED if level == "auto" else LOW_BLOCKED
    found = tuple(
        sorted(
            {
                d["class"]
                for d in detections
                if d["class"] in limits and d["score"] >= limits[d["class"]]
            }
        )
    )
    return ImageVerdict(flagged=bool(found), labels=found)


class NudeNetChecker:
    """NudeNet's 320 px detector on the CPU (one ONNX session per process)."""

    def __init__(self) -> None:
        import nudenet
        import onnxruntime
        from nudenet import NudeDetector

        self._detector = NudeDetector()
        # One thread: it runs beside a router's event loop (or a worker's pipeline), and
        # onnxruntime's default of a thread per core would contend with both.
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        model = Path(nudenet.__file__).with_name("320n.onnx")
        self._detector.onnx_session = onnxruntime.InferenceSession(
            str(model), options, providers=["CPUExecutionProvider"]
        )

    def check(self, images: list[Any], level: Level) -> list[ImageVerdict]:
        import numpy as np

        verdicts = []
        for image in images:
            rgba = np.asarray(image.convert("RGBA"))  # its reader converts RGBA to BGR
            verdicts.append(verdict_of(self._detector.detect(rgba), level))
        return verdicts


def load_image_checker(name: str) -> ImageChecker | None:
    """``nudenet``, ``none`` (no image check), or ``package.module:Class``."""
    if name == "none":
        return None
    if name == "nudenet":
        return NudeNetChecker()
    module, _, attribute = name.partition(":")
    if not module or not attribute:
        raise ValueError(f"image_checker {name!r}: nudenet, none, or package.module:Class")
    checker: ImageChecker = getattr(importlib.import_module(module), attribute)()
    return checker
