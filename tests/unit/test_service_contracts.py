"""The deployments and their test fakes speak the same Protocols
(``mediagate.protocol.services``): what one hop calls on the next through a handle.

mypy checks the assignments below structurally (a method renamed, a parameter or a
return type changed on either side fails the type check); the test checks the same at
run time, parameter names and sync/async included, so a plain ``pytest`` run also
catches a fake that drifted from production.
"""

from __future__ import annotations

import inspect

import pytest

from deployments.scheduler.images import Scheduler
from deployments.scheduler.videos import VideoScheduler
from deployments.workers.step_level import StepLevelTextToImage
from deployments.workers.text_to_image import TextToImage
from deployments.workers.text_to_video import TextToVideo
from mediagate.protocol.services import (
    ImageScheduling,
    ImageWorking,
    VideoScheduling,
    VideoWorking,
)
from tests.fakes import FakeImageWorker, FakeScheduler, FakeVideoScheduler, FakeVideoWorker

IMAGE_SCHEDULERS: list[type[ImageScheduling]] = [Scheduler, FakeScheduler]
VIDEO_SCHEDULERS: list[type[VideoScheduling]] = [VideoScheduler, FakeVideoScheduler]
IMAGE_WORKERS: list[type[ImageWorking]] = [TextToImage, StepLevelTextToImage, FakeImageWorker]
VIDEO_WORKERS: list[type[VideoWorking]] = [TextToVideo, FakeVideoWorker]

CONTRACTS: list[tuple[type, list[type]]] = [
    (ImageScheduling, list(IMAGE_SCHEDULERS)),
    (VideoScheduling, list(VIDEO_SCHEDULERS)),
    (ImageWorking, list(IMAGE_WORKERS)),
    (VideoWorking, list(VIDEO_WORKERS)),
]


def protocol_methods(protocol: type) -> dict[str, object]:
    return {
        name: member
        for name, member in vars(protocol).items()
        if inspect.isfunction(member) and not name.startswith("_")
    }


def shape(function: object) -> tuple[bool, list[tuple[str, object, str]]]:
    """Whether it is a coroutine function, and its parameters (name, kind, annotation)
    after ``self``; annotations are the strings of ``from __future__ import annotations``."""
    signature = inspect.signature(function)  # type: ignore[arg-type]
    parameters = list(signature.parameters.values())[1:]
    return inspect.iscoroutinefunction(function), [
        (parameter.name, parameter.kind, str(parameter.annotation)) for parameter in parameters
    ] + [("return", None, str(signature.return_annotation))]


@pytest.mark.parametrize(
    ("protocol", "implementation"),
    [(protocol, cls) for protocol, classes in CONTRACTS for cls in classes],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_each_deployment_and_its_fake_implement_the_protocol(
    protocol: type, implementation: type
) -> None:
    for name, method in protocol_methods(protocol).items():
        assert hasattr(implementation, name), f"{implementation.__name__} lacks {name}"
        assert shape(getattr(implementation, name)) == shape(method), (
            f"{implementation.__name__}.{name} differs from {protocol.__name__}.{name}"
        )


def test_a_drifted_fake_is_caught() -> None:
    """The comparison sees a renamed parameter and a lost ``async``."""

    class Renamed:
        async def submit(self, request: object) -> object: ...

    class Blocking:
        def run(self, task: object) -> object: ...

    assert shape(Renamed.submit) != shape(protocol_methods(ImageScheduling)["submit"])
    assert shape(Blocking.run)[0] != shape(protocol_methods(VideoWorking)["run"])[0]
