"""Moderation: the prompt terms and the detector's decision as pure functions; the real
NudeNet detector on a generated image; and through the router: a blocked prompt or
upload is a 400 ``moderation_blocked`` that costs no quota and reaches no worker; a
flagged output is withheld and not charged; ``moderation: low`` only where the tier
allows it."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image

from mediagate.moderation.images import NudeNetChecker, load_image_checker, verdict_of
from mediagate.moderation.moderator import Moderator
from mediagate.moderation.prompts import flagged_categories, load_prompt_terms, normalised
from mediagate.moderation.settings import ModerationSettings
from tests.moderation_checkers import FlagsBrightRed
from tests.unit.harness import Service

TERMS = load_prompt_terms()
CHECKER = "tests.moderation_checkers:FlagsBrightRed"


@pytest.mark.parametrize(
    ("prompt", "auto", "low"),
    [
        ("a lighthouse at dusk", [], []),
        ("a cat in Essex, Scunthorpe", [], []),  # words, not substrings
        ("a naked mole rat", [], []),  # "naked" alone is not a category
        ("P0RN, hd", ["sexual"], []),  # look-alike digits folded
        ("a gory battle", ["violence/graphic"], []),
        ("a NAKED teen", ["sexual/minors"], ["sexual/minors"]),  # blocked at every level
        ("Kid, sèxy pose", ["sexual/minors"], ["sexual/minors"]),  # accents folded
    ],
)
def test_prompt_categories(prompt: str, auto: list[str], low: list[str]) -> None:
    assert flagged_categories(prompt, TERMS, "auto") == auto
    assert flagged_categories(prompt, TERMS, "low") == low


def test_normalising_makes_word_boundaries_spaces() -> None:
    assert normalised("Hello,   WORLD!! s3x") == " hello world sex "


def test_the_detectors_decision_per_level() -> None:
    breast = [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.8, "box": [0, 0, 1, 1]}]
    genitals = [{"class": "MALE_GENITALIA_EXPOSED", "score": 0.7, "box": [0, 0, 1, 1]}]
    faint = [{"class": "MALE_GENITALIA_EXPOSED", "score": 0.3, "box": [0, 0, 1, 1]}]
    face = [{"class": "FACE_FEMALE", "score": 0.99, "box": [0, 0, 1, 1]}]
    assert verdict_of(breast, "auto").flagged and not verdict_of(breast, "low").flagged
    assert verdict_of(genitals, "auto").flagged and verdict_of(genitals, "low").flagged
    assert not verdict_of(faint, "auto").flagged
    assert not verdict_of(face, "auto").flagged
    assert verdict_of(breast + face, "auto").labels == ("FEMALE_BREAST_EXPOSED",)


def test_the_shipped_detector_runs_offline_on_a_generated_image() -> None:
    import numpy as np

    checker = load_image_checker("nudenet")
    assert isinstance(checker, NudeNetChecker)
    noise = Image.fromarray((np.random.default_rng(3).random((96, 64, 3)) * 255).astype("uint8"))
    [verdict] = checker.check([noise], "auto")
    assert not verdict.flagged
    assert load_image_checker("none") is None
    assert isinstance(load_image_checker(CHECKER), FlagsBrightRed)
    with pytest.raises(ValueError):
        load_image_checker("not-a-path")


@pytest.fixture
def service(tmp_path: Path) -> Service:
    moderator = Moderator(ModerationSettings(image_checker=CHECKER))
    return Service(tmp_path, tier="free", moderator=moderator)


def images_today(service: Service, name: str = "alice") -> int:
    account = service.accounts.get_account(name)
    assert account is not None
    return asyncio.run(service.gateway.guard.ledger.usage(account)).images_today


def settled_to(service: Service, images: int, timeout_s: float = 10.0) -> bool:
    """Whether the account's images today reach ``images`` within ``timeout_s`` (a
    reservation counts until it is settled: released, it goes; committed, it stays)."""
    deadline = time.monotonic() + timeout_s
    while images_today(service) != images:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def refused(answer: Any, param: str | None) -> None:
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (
        "moderation_blocked",
        param,
        "invalid_request_error",
    )


def test_a_blocked_prompt_costs_nothing_and_reaches_no_worker(service: Service) -> None:
    counted: list[tuple[str, str]] = []
    service.gateway.on_refusal = lambda tier, code: counted.append((tier, code))
    refused(service.generate({"prompt": "a gory battle scene"}), "prompt")
    assert service.scheduler.jobs == [] and images_today(service) == 0
    assert counted == [("free", "moderation_blocked")]  # per tier, in Prometheus
    assert service.generate({"prompt": "a calm battle scene", "seed": 10}).status_code == 200
    assert images_today(service) == 1


def test_low_only_where_the_tier_allows_it(service: Service) -> None:
    answer = service.generate({"prompt": "a gory battle", "moderation": "low", "seed": 10})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "moderation"
    assert service.scheduler.jobs == [] and images_today(service) == 0
    pro = service.other_auth("paula", "pro")  # the shipped tier file allows low for pro
    allowed = service.client.post(
        "/v1/images/generations",
        json={"prompt": "a gory battle", "moderation": "low", "seed": 10},
        headers=pro,
    )
    assert allowed.status_code == 200, allowed.text
    minors = service.client.post(
        "/v1/images/generations",
        json={"prompt": "naked teen", "moderation": "low"},
        headers=pro,
    )
    refused(minors, "prompt")  # blocked at every level


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
def test_a_flagged_output_is_withheld_and_not_charged(
    service: Service, response_format: str
) -> None:
    # the fake worker paints the seed's red: 250 is what the test checker flags
    answer = service.generate(
        {"prompt": "a red square", "seed": 250, "response_format": response_format}
    )
    refused(answer, None)
    assert "b64_json" not in answer.text and images_today(service) == 0
    assert list(service.artifacts.root.glob("**/img_*")) == []  # nothing stored
    assert service.generate({"prompt": "a dark square", "seed": 10}).status_code == 200
    assert images_today(service) == 1


def test_a_flagged_upload_is_refused_before_any_work(service: Service) -> None:
    client = openai.OpenAI(
        base_url="http://testserver/v1",
        api_key=service.key,
        http_client=service.client,
        max_retries=0,
    )
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (250, 10, 10)).save(buffer, "PNG")
    with pytest.raises(openai.BadRequestError) as blocked:
        client.images.edit(image=("in.png", buffer.getvalue(), "image/png"), prompt="x")
    assert blocked.value.code == "moderation_blocked"
    assert service.scheduler.jobs == [] and images_today(service) == 0


def test_a_flagged_stream_ends_with_an_error_event_uncharged(service: Service) -> None:
    client = openai.OpenAI(
        base_url="http://testserver/v1",
        api_key=service.key,
        http_client=service.client,
        max_retries=0,
    )
    counted: list[tuple[str, str]] = []
    service.gateway.on_refusal = lambda tier, code: counted.append((tier, code))
    stream = client.images.generate(prompt="x", stream=True, extra_body={"seed": 250})
    with pytest.raises(openai.APIError, match="safety system"):
        for event in stream:
            assert event.type != "image_generation.completed"
    # The stream settles as it ends, after the client has read the error event: its
    # reservation (counted until then) is given back, never committed.
    assert settled_to(service, 0)
    assert counted == [("free", "moderation_blocked")]


def test_video_prompts_and_references_are_checked(tmp_path: Path) -> None:
    moderator = Moderator(ModerationSettings(image_checker=CHECKER))
    service = Service(tmp_path, tier="pro", moderator=moderator)
    refused(
        service.client.post(
            "/v1/videos", json={"prompt": "a decapitated statue"}, headers=service.auth
        ),
        "prompt",
    )
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (255, 0, 0)).save(buffer, "PNG")
    answer = service.client.post(
        "/v1/videos",
        data={"prompt": "it moves"},
        files={"input_reference": ("in.png", buffer.getvalue(), "image/png")},
        headers=service.auth,
    )
    refused(answer, "input_reference")
    assert service.video_scheduler.enqueued == []
    listed = service.client.get("/v1/videos", headers=service.auth).json()
    assert listed["data"] == []
