"""The Videos API in-process: validation, uploads, ownership, paging, content, remix, expiry."""

from __future__ import annotations

import asyncio
import base64
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from mediagate.access.tiers import TierPolicy, load_tier_policy
from mediagate.stores import VideoJobRecord
from models.catalog import load_catalog, parse_catalog
from tests.fakes import solid_png
from tests.unit.harness import Service


def roomy_policy() -> TierPolicy:
    """The shipped policy with room for many video jobs: these tests are about the API."""
    policy = load_tier_policy()
    pro = policy.tiers["pro"].model_copy(update={"video_jobs_at_once": 100})
    return policy.model_copy(update={"tiers": {**policy.tiers, "pro": pro}})


@pytest.fixture
def service(tmp_path: Path) -> Service:
    return Service(tmp_path, policy=roomy_policy(), poll_after_ms=250, max_upload_bytes=64 * 1024)


def create(service: Service, body: dict[str, Any], **kwargs: Any) -> Any:
    return service.client.post("/v1/videos", json=body, headers=service.auth, **kwargs)


def assert_error(response: Any, status: int, param: str | None, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


def owner_id(service: Service) -> str:
    account = service.accounts.ensure_account("alice", "pro")
    return account.id


def all_jobs(service: Service) -> list[VideoJobRecord]:
    jobs, _ = asyncio.run(
        service.jobs.list_jobs(owner_id(service), after=None, limit=100, order="asc")
    )
    return jobs


def reference_files(service: Service) -> list[str]:
    return [path.name for path in service.artifacts.root.iterdir() if path.name.startswith("ref_")]


def complete(service: Service, job_id: str, *, expires_in_s: float = 3600) -> None:
    artifacts = {
        "video": service.artifacts.put(b"\x00\x00\x00\x18ftypmp42", "mp4", "vid"),
        "thumbnail": service.artifacts.put(b"RIFF....WEBP", "webp", "vid"),
        "spritesheet": service.artifacts.put(b"\xff\xd8\xff jpeg", "jpeg", "vid"),
    }
    now = service.clock()
    updated = asyncio.run(
        service.jobs.update_job(
            owner_id(service),
            job_id,
            expect_status=("queued",),
            changes={
                "status": "completed",
                "progress": 100,
                "completed_at": now,
                "expires_at": now + expires_in_s,
                "artifacts": artifacts,
            },
        )
    )
    assert updated is not None


def test_json_create_stores_a_queued_job_and_hands_it_over(service: Service) -> None:
    response = create(service, {"prompt": "a cat", "seconds": "4", "seed": 7})
    assert response.status_code == 200, response.text
    assert response.headers["openai-poll-after-ms"] == "250"
    assert response.headers["x-ratelimit-limit-requests"] == "60"  # the pro tier's rate
    video = response.json()
    assert video["object"] == "video" and video["id"].startswith("video_")
    assert (video["status"], video["progress"], video["model"]) == ("queued", 0, "tiny-wan")
    assert (video["seconds"], video["size"], video["error"]) == ("4", "64x64", None)
    assert video["created_at"] == int(service.clock()) and video["completed_at"] is None
    [job] = all_jobs(service)
    assert job.id == video["id"] and job.status == "queued"
    assert job.generation["num_frames"] == 33 and job.generation["fps"] == 8
    assert job.generation["seed"] == 7 and job.generation["num_inference_steps"] == 4
    assert job.priority_class == 2  # the pro tier's: the video queue serves it first
    assert service.video_scheduler.enqueued == [(job.account_id, job.id)]

    again = service.client.get(f"/v1/videos/{video['id']}", headers=service.auth)
    assert again.json() == {**video, "queue_position": 1}
    assert again.headers["openai-poll-after-ms"] == "250"
    second = create(service, {"prompt": "a dog"}).json()
    got = service.client.get(f"/v1/videos/{second['id']}", headers=service.auth).json()
    assert got["queue_position"] == 2


def test_multipart_create_like_client_3x(service: Service) -> None:
    # (None, value) parts make httpx send multipart/form-data, as the 3.x client does.
    response = service.client.post(
        "/v1/videos",
        files={
            "prompt": (None, "a dog"),
            "seconds": (None, "8"),
            "size": (None, "32x48"),
            "num_inference_steps": (None, "6"),
        },
        headers=service.auth,
    )
    assert response.status_code == 200, response.text
    [job] = all_jobs(service)
    assert (job.generation["width"], job.generation["height"]) == (32, 48)
    assert job.generation["num_frames"] == 65 and job.generation["num_inference_steps"] == 6
    assert job.seconds == 8


def test_multipart_upload_is_kept_as_the_reference(service: Service) -> None:
    png = solid_png(40, 40, seed=3)
    response = service.client.post(
        "/v1/videos",
        files={"prompt": (None, "move"), "input_reference": ("ref.png", png, "image/png")},
        headers=service.auth,
    )
    assert response.status_code == 200, response.text
    [job] = all_jobs(service)
    reference = job.generation["input_reference"]
    assert reference.startswith("ref_") and service.artifacts.read(reference) == png


def test_json_reference_as_a_data_url(service: Service) -> None:
    png = solid_png(16, 16, seed=1)
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    response = create(service, {"prompt": "x", "input_reference": {"image_url": data_url}})
    assert response.status_code == 200, response.text
    assert reference_files(service)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` pixels but carries almost no data: a bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"seconds": "4"}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "seconds": "5"}, "seconds"),
        ({"prompt": "x", "seconds": "four"}, "seconds"),
        ({"prompt": "x", "seconds": 4}, "seconds"),
        ({"prompt": "x", "seconds": "\u00b2"}, "seconds"),  # a digit to isdigit(), not int()
        ({"prompt": "x", "seconds": "4" * 5000}, "seconds"),  # past int()'s digit limit
        ({"prompt": "x", "size": "65x64"}, "size"),
        ({"prompt": "x", "size": "1280x720"}, "size"),
        ({"prompt": "x", "size": "big"}, "size"),
        ({"prompt": "x", "num_inference_steps": 51}, "num_inference_steps"),
        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "x", "model": "tiny-sd"}, "model"),
        ({"prompt": "x", "fps": 30}, "fps"),
        (
            {"prompt": "x", "input_reference": {"image_url": "https://example.com/a.png"}},
            "input_reference",
        ),
        ({"prompt": "x", "input_reference": {"file_id": "file_1"}}, "input_reference"),
        (
            {"prompt": "x", "input_reference": {"image_url": "data:image/png;base64,@@@"}},
            "input_reference",
        ),
        ({"prompt": "x" * 4001}, "prompt"),
    ],
)
def test_bad_fields_are_400_naming_them_and_change_nothing(
    service: Service, body: dict[str, Any], param: str
) -> None:
    assert_error(create(service, body), 400, param)
    assert all_jobs(service) == [] and reference_files(service) == []
    assert service.video_scheduler.enqueued == []


def test_unknown_model_is_404(service: Service) -> None:
    assert_error(
        create(service, {"prompt": "x", "model": "sora-2"}), 404, "model", "model_not_found"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GIF89a not allowed", "not a PNG, JPEG or WebP"),
        (b"\x89PNG\r\n\x1a\n truncated", "cannot be read"),
        (png_header_only(50_000, 50_000), "limit is"),
        (png_header_only(10_000, 10_000), "limit is"),
        (png_header_only(16, 16), "is damaged"),  # a valid header, no pixel data
    ],
    ids=["gif", "truncated-png", "bomb-over-pillow-limit", "bomb-over-our-limit", "no-pixels"],
)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_uploads_are_checked_before_decoding(service: Service, data: bytes, message: str) -> None:
    response = service.client.post(
        "/v1/videos",
        files={"prompt": (None, "x"), "input_reference": ("ref.png", data, "image/png")},
        headers=service.auth,
    )
    assert_error(response, 400, "input_reference")
    assert message in response.json()["error"]["message"]
    assert " at 0x" not in response.text and "<" not in response.json()["error"]["message"]
    assert all_jobs(service) == [] and reference_files(service) == []


def test_the_quota_is_decided_before_the_reference_is_decoded(tmp_path: Path) -> None:
    """An account at its tier's jobs at once is refused (429) for a damaged reference
    that a decode would have refused (400): the decision came first. With a slot free,
    the damaged image is found when decoded, a 400, and the slot given back."""
    service = Service(tmp_path)  # the shipped tiers: pro runs 4 video jobs at once
    for number in range(4):
        assert create(service, {"prompt": f"job {number}"}).status_code == 200
    damaged = png_header_only(16, 16)  # a valid header, no pixel data

    def with_reference() -> Any:
        return service.client.post(
            "/v1/videos",
            files={"prompt": (None, "x"), "input_reference": ("ref.png", damaged, "image/png")},
            headers=service.auth,
        )

    assert_error(with_reference(), 429, None, "concurrent_jobs_exceeded")
    service.client.delete(f"/v1/videos/{all_jobs(service)[0].id}", headers=service.auth)
    assert_error(with_reference(), 400, "input_reference")
    assert len(all_jobs(service)) == 3 and reference_files(service) == []
    assert create(service, {"prompt": "the slot was given back"}).status_code == 200


def test_oversized_upload_is_413(service: Service) -> None:
    response = service.client.post(
        "/v1/videos",
        files={"prompt": (None, "x"), "input_reference": ("r.png", b"\x00" * 70_000, "image/png")},
        headers=service.auth,
    )
    assert_error(response, 413, None)
    assert all_jobs(service) == []


def test_reference_to_a_text_only_model_is_400(tmp_path: Path) -> None:
    data = {
        "models": {"tiny-wan": {**load_catalog().models["tiny-wan"].model_dump(exclude={"id"})}}
    }
    data["models"]["tiny-wan"]["video"]["image_to_video_pipeline_class"] = None
    service = Service(tmp_path, catalog=parse_catalog(data))
    png = solid_png(16, 16, seed=1)
    response = service.client.post(
        "/v1/videos",
        files={"prompt": (None, "x"), "input_reference": ("r.png", png, "image/png")},
        headers=service.auth,
    )
    assert_error(response, 400, "input_reference", "unsupported_parameter")
    assert all_jobs(service) == [] and reference_files(service) == []


def test_other_accounts_get_404_for_everything(service: Service) -> None:
    video_id = create(service, {"prompt": "mine"}).json()["id"]
    complete(service, video_id)
    other = service.other_auth()
    for method, path in [
        ("GET", f"/v1/videos/{video_id}"),
        ("DELETE", f"/v1/videos/{video_id}"),
        ("GET", f"/v1/videos/{video_id}/content"),
        ("GET", f"/v1/videos/{video_id}/content?variant=thumbnail"),
    ]:
        assert_error(service.client.request(method, path, headers=other), 404, "video_id")
    remix = service.client.post(f"/v1/videos/{video_id}/remix", json={"prompt": "y"}, headers=other)
    assert_error(remix, 404, "video_id")
    assert service.client.get("/v1/videos", headers=other).json()["data"] == []
    assert service.client.get(f"/v1/videos/{video_id}", headers=service.auth).status_code == 200


def test_list_pages_with_after_limit_and_order(service: Service) -> None:
    ids = []
    for index in range(5):
        ids.append(create(service, {"prompt": f"p{index}"}).json()["id"])
        service.clock.advance(1)
    page = service.client.get("/v1/videos?limit=2", headers=service.auth).json()
    assert [v["id"] for v in page["data"]] == ids[::-1][:2] and page["has_more"]
    assert page["object"] == "list" and page["last_id"] == ids[3]
    page = service.client.get(f"/v1/videos?limit=2&after={page['last_id']}", headers=service.auth)
    assert [v["id"] for v in page.json()["data"]] == [ids[2], ids[1]]
    asc = service.client.get("/v1/videos?order=asc&limit=10", headers=service.auth).json()
    assert [v["id"] for v in asc["data"]] == ids and not asc["has_more"]
    assert_error(service.client.get("/v1/videos?limit=0", headers=service.auth), 400, "limit")
    assert_error(service.client.get("/v1/videos?order=up", headers=service.auth), 400, "order")


def test_delete_takes_a_queued_job_off_the_queue(service: Service) -> None:
    video_id = create(service, {"prompt": "x"}).json()["id"]
    response = service.client.delete(f"/v1/videos/{video_id}", headers=service.auth)
    assert response.json() == {"id": video_id, "object": "video.deleted", "deleted": True}
    assert service.video_scheduler.cancelled == [(owner_id(service), video_id)]
    assert_error(
        service.client.get(f"/v1/videos/{video_id}", headers=service.auth), 404, "video_id"
    )
    again = service.client.delete(f"/v1/videos/{video_id}", headers=service.auth)
    assert_error(again, 404, "video_id")


def test_content_variants_expiry_and_purge(service: Service) -> None:
    video_id = create(service, {"prompt": "x"}).json()["id"]
    not_ready = service.client.get(f"/v1/videos/{video_id}/content", headers=service.auth)
    assert_error(not_ready, 400, "video_id", "video_not_ready")
    complete(service, video_id, expires_in_s=600)
    for variant, media_type in [
        ("video", "video/mp4"),
        ("thumbnail", "image/webp"),
        ("spritesheet", "image/jpeg"),
    ]:
        response = service.client.get(
            f"/v1/videos/{video_id}/content?variant={variant}", headers=service.auth
        )
        assert response.status_code == 200 and response.headers["content-type"] == media_type
    bad = service.client.get(f"/v1/videos/{video_id}/content?variant=gif", headers=service.auth)
    assert_error(bad, 400, "variant")

    service.clock.advance(601)
    expired = service.client.get(f"/v1/videos/{video_id}/content", headers=service.auth)
    assert_error(expired, 410, "video_id", "expired")
    files_before = list(service.artifacts.root.iterdir())
    assert len(files_before) == 3
    assert asyncio.run(service.gateway.videos.purge_expired()) == 1
    assert list(service.artifacts.root.iterdir()) == []
    assert_error(
        service.client.get(f"/v1/videos/{video_id}", headers=service.auth), 404, "video_id"
    )


def test_remix_keeps_settings_and_seed_with_a_new_prompt(service: Service) -> None:
    png = solid_png(16, 16, seed=1)
    source = service.client.post(
        "/v1/videos",
        files={
            "prompt": (None, "first"),
            "size": (None, "32x32"),
            "seed": (None, "99"),
            "input_reference": ("r.png", png, "image/png"),
        },
        headers=service.auth,
    ).json()
    early = service.client.post(
        f"/v1/videos/{source['id']}/remix", json={"prompt": "second"}, headers=service.auth
    )
    assert_error(early, 400, "video_id", "video_not_ready")
    complete(service, source["id"])
    remix = service.client.post(
        f"/v1/videos/{source['id']}/remix", json={"prompt": "second"}, headers=service.auth
    ).json()
    assert remix["remixed_from_video_id"] == source["id"] and remix["status"] == "queued"
    jobs = {job.id: job for job in all_jobs(service)}
    original, remixed = jobs[source["id"]], jobs[remix["id"]]
    assert remixed.generation["seed"] == 99 and remixed.generation["prompt"] == "second"
    assert remixed.size == original.size == "32x32"
    # The remix owns a copy of the reference, so deleting the source keeps it working.
    assert remixed.generation["input_reference"] != original.generation["input_reference"]
    service.client.delete(f"/v1/videos/{source['id']}", headers=service.auth)
    assert service.artifacts.read(remixed.generation["input_reference"]) == png


def test_an_unreachable_scheduler_still_accepts_the_job(tmp_path: Path) -> None:
    service = Service(tmp_path)
    service.video_scheduler.unreachable = True
    response = create(service, {"prompt": "x"})
    assert response.status_code == 200 and response.json()["status"] == "queued"
    assert service.video_scheduler.attempts == ["admit", "enqueue"]  # both failed
    [job] = all_jobs(service)
    assert job.status == "queued"  # the scheduler's reconcile loop will find it


def test_failed_job_shows_its_error(service: Service) -> None:
    video_id = create(service, {"prompt": "x"}).json()["id"]
    asyncio.run(
        service.jobs.update_job(
            owner_id(service),
            video_id,
            expect_status=("queued",),
            changes={
                "status": "failed",
                "completed_at": service.clock(),
                "error_code": "worker_lost",
                "error_message": "the worker stopped",
            },
        )
    )
    video = service.client.get(f"/v1/videos/{video_id}", headers=service.auth).json()
    assert video["status"] == "failed"
    assert video["error"] == {"code": "worker_lost", "message": "the worker stopped"}


def test_create_requires_a_key(service: Service) -> None:
    response = service.client.post("/v1/videos", json={"prompt": "x"})
    assert_error(response, 401, None)
    assert all_jobs(service) == []
