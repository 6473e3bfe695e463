"""The artifact store's contract on both backends (local files, S3 via moto's HTTP server),
and catalog weights fetched from ``s3://`` into the model cache."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mediagate.protocol.catalog import ModelSpec
from mediagate.protocol.errors import NotFound
from mediagate.stores.artifacts import ArtifactConfig, ArtifactStore, open_artifact_store
from models.loading import download_s3_weights, load_pipeline
from tests.fakes import FakeClock


def make_bucket(endpoint: str) -> str:
    from mediagate.stores.artifacts import s3_client

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_client(endpoint_url=endpoint, region="us-east-1").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(params=["local", "s3"])
def store_and_clock(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[ArtifactStore, FakeClock]]:
    clock = FakeClock(time.time())
    if request.param == "local":
        config = ArtifactConfig(
            backend="local", root=str(tmp_path / "files"), secret_path=str(tmp_path / "key")
        )
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        config = ArtifactConfig(
            backend="s3",
            s3_bucket=make_bucket(endpoint),
            s3_endpoint_url=endpoint,
            s3_region="us-east-1",
        )
    yield open_artifact_store(config, clock=clock), clock


def test_put_read_delete(store_and_clock: tuple[ArtifactStore, Any]) -> None:
    store, _ = store_and_clock
    video_id = store.put(b"\x00mp4 bytes", "mp4", "vid")
    assert video_id.startswith("vid_") and video_id.endswith(".mp4")
    assert store.read(video_id) == b"\x00mp4 bytes"
    store.delete(video_id)
    store.delete(video_id)  # already gone: no error
    with pytest.raises(NotFound):
        store.read(video_id)
    with pytest.raises(NotFound):
        store.read("../../etc/passwd")


def test_url_downloads_without_a_key(store_and_clock: tuple[ArtifactStore, Any]) -> None:
    store, _ = store_and_clock
    image_id = store.put(b"png bytes", "png", "img")
    url = store.url(image_id, 600, "http://router.invalid/")
    if url.startswith("http://router.invalid/"):
        assert "/v1/files/" in url and "signature=" in url  # served by the router (unit-tested)
    else:
        response = httpx.get(url)  # a presigned URL straight to the S3 endpoint
        assert response.status_code == 200 and response.content == b"png bytes"
        assert "X-Amz-Expires=600" in url


def test_sweep_removes_only_old_artifacts_of_its_kind(
    store_and_clock: tuple[ArtifactStore, Any], tmp_path: Path
) -> None:
    store, clock = store_and_clock
    old_image = store.put(b"old", "png", "img")
    video = store.put(b"video", "mp4", "vid")
    assert store.delete_older_than(3600, "img") == 0  # both are new
    clock.advance(10**8)  # files carry real timestamps; the store's clock decides what is old
    assert store.delete_older_than(3600, "img") == 1
    with pytest.raises(NotFound):
        store.read(old_image)
    assert store.read(video) == b"video"


def test_s3_weights_download_once_then_load(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tiny pipeline saved with save_pretrained, uploaded to S3, loaded from s3://."""
    from mediagate.stores.artifacts import s3_client
    from models.tiny import ensure_tiny_pipeline

    local = ensure_tiny_pipeline("stable-diffusion", tmp_path / "tiny")
    client = s3_client(endpoint_url=s3_endpoint, region="us-east-1")
    bucket = make_bucket(s3_endpoint)
    for path in local.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"weights/sd/{path.relative_to(local)}")

    spec = ModelSpec(
        id="s3-sd",
        task="text-to-image",
        source=f"s3://{bucket}/weights/sd",
        pipeline_class="StableDiffusionPipeline",
        defaults={"size": "64x64", "num_inference_steps": 2},
    )
    monkeypatch.setenv("MEDIAGATE_S3_ENDPOINT_URL", s3_endpoint)
    pipeline = load_pipeline(spec, cache_dir=tmp_path / "cache")
    image = pipeline(prompt="x", width=64, height=64, num_inference_steps=1).images[0]
    assert image.size == (64, 64)

    fetched = tmp_path / "cache" / "s3" / bucket / "weights" / "sd"
    assert sorted(p.name for p in fetched.iterdir()) == sorted(p.name for p in local.iterdir())
    # Once cached, S3 is not asked again: an unreachable endpoint changes nothing.
    monkeypatch.setenv("MEDIAGATE_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    again = download_s3_weights(f"s3://{bucket}/weights/sd", tmp_path / "cache" / "s3")
    assert again == fetched


def test_s3_weights_without_a_pipeline_are_refused(s3_endpoint: str, tmp_path: Path) -> None:
    from mediagate.stores.artifacts import s3_client

    client = s3_client(endpoint_url=s3_endpoint, region="us-east-1")
    bucket = make_bucket(s3_endpoint)
    client.put_object(Bucket=bucket, Key="junk/readme.txt", Body=b"not a model")
    with pytest.raises(ValueError, match=r"model_index\.json"):
        download_s3_weights(f"s3://{bucket}/junk", tmp_path / "cache", client=client)
    assert not (tmp_path / "cache" / bucket / "junk").exists()


@pytest.mark.parametrize("key", ["evil/../../escaped.txt", "evil//etc/escaped.txt"])
def test_s3_keys_cannot_write_outside_the_model_cache(
    s3_endpoint: str, tmp_path: Path, key: str
) -> None:
    from mediagate.stores.artifacts import s3_client

    client = s3_client(endpoint_url=s3_endpoint, region="us-east-1")
    bucket = make_bucket(s3_endpoint)
    client.put_object(Bucket=bucket, Key="evil/model_index.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key=key, Body=b"written outside")
    with pytest.raises(ValueError, match="leaves its folder"):
        download_s3_weights(f"s3://{bucket}/evil", tmp_path / "cache", client=client)
    assert [p for p in tmp_path.rglob("escaped.txt")] == []
    with pytest.raises(ValueError, match="leaves the model cache"):
        download_s3_weights(f"s3://{bucket}/../../x", tmp_path / "cache", client=client)


def test_remote_weights_load_only_as_safetensors(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pickled checkpoint (which runs code when loaded) on S3 is refused."""
    from mediagate.protocol.errors import ModelUnavailable
    from mediagate.stores.artifacts import s3_client
    from models.tiny import ensure_tiny_pipeline

    local = ensure_tiny_pipeline("stable-diffusion", tmp_path / "tiny")
    pickled = tmp_path / "pickled"
    spec = ModelSpec(
        id="pickled-sd",
        task="text-to-image",
        source=str(local),
        pipeline_class="StableDiffusionPipeline",
        defaults={"size": "64x64", "num_inference_steps": 2},
    )
    load_pipeline(spec, cache_dir=tmp_path / "cache").save_pretrained(
        pickled, safe_serialization=False
    )
    # diffusers writes the UNet and VAE pickled (transformers keeps safetensors for text)
    assert not list((pickled / "unet").glob("*.safetensors"))
    client = s3_client(endpoint_url=s3_endpoint, region="us-east-1")
    bucket = make_bucket(s3_endpoint)
    for path in pickled.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"weights/pickled/{path.relative_to(pickled)}")
    monkeypatch.setenv("MEDIAGATE_S3_ENDPOINT_URL", s3_endpoint)
    remote = spec.model_copy(update={"source": f"s3://{bucket}/weights/pickled"})
    with pytest.raises(ModelUnavailable, match="safetensors"):
        load_pipeline(remote, cache_dir=tmp_path / "cache")


def test_hub_ids_split_their_pinned_revision() -> None:
    from models.loading import split_revision

    assert split_revision("org/model@0123abc") == ("org/model", "0123abc")
    assert split_revision("org/model") == ("org/model", None)


def test_image_urls_from_the_router_are_presigned_s3_urls(s3_endpoint: str, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from deployments.router.routes import create_api
    from mediagate.stores.artifacts import S3ArtifactStore
    from tests.unit.harness import Service

    service = Service(tmp_path)
    service.gateway.artifacts = S3ArtifactStore(
        make_bucket(s3_endpoint), endpoint_url=s3_endpoint, region="us-east-1"
    )
    client = TestClient(create_api(service.gateway))
    body = client.post(
        "/v1/images/generations",
        json={"prompt": "x", "response_format": "url"},
        headers=service.auth,
    ).json()
    [item] = body["data"]
    assert item["url"].startswith(s3_endpoint)
    image = httpx.get(item["url"])
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert image.headers["content-type"] == "image/png"


def test_backends_follow_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mediagate.settings import HomeLayout, Settings, artifact_config, state_config

    layout = HomeLayout(tmp_path)
    plain = Settings()
    assert state_config(plain, layout).backend == "sqlite"
    assert state_config(plain, layout).sqlite_path == str(layout.state_db)
    assert artifact_config(plain, layout).backend == "local"

    monkeypatch.setenv("MEDIAGATE_REDIS_URL", "redis://cache:6379/1")
    monkeypatch.setenv("MEDIAGATE_S3_BUCKET", "media")
    monkeypatch.setenv("MEDIAGATE_S3_ENDPOINT_URL", "http://minio:9000")
    configured = Settings()
    state = state_config(configured, layout)
    artifacts = artifact_config(configured, layout)
    assert (state.backend, state.redis_url) == ("redis", "redis://cache:6379/1")
    assert (artifacts.backend, artifacts.s3_bucket) == ("s3", "media")
    assert artifacts.s3_endpoint_url == "http://minio:9000"


def test_an_unreachable_s3_is_a_503_that_names_no_endpoint(s3_endpoint: str) -> None:
    """A bucket that exists on a store that stopped answering (a port nothing listens
    on): every call is ``StoreUnavailable`` with Retry-After, within the bounded
    connect timeout, and the answer names neither the endpoint nor the bucket;
    a missing object on a working store is still a 404."""
    from mediagate.protocol.errors import StoreUnavailable
    from tests.servers import free_port

    bucket = make_bucket(s3_endpoint)
    working = open_artifact_store(
        ArtifactConfig(backend="s3", s3_bucket=bucket, s3_endpoint_url=s3_endpoint)
    )
    with pytest.raises(NotFound):
        working.read("img_" + "0" * 32 + ".png")
    stopped = f"http://127.0.0.1:{free_port()}"
    down = open_artifact_store(
        ArtifactConfig(backend="s3", s3_bucket=bucket, s3_endpoint_url=stopped)
    )
    started = time.monotonic()
    for call in (
        lambda: down.put(b"png", "png", "img"),
        lambda: down.read("img_" + "0" * 32 + ".png"),
        lambda: down.delete("img_" + "0" * 32 + ".png"),
    ):
        with pytest.raises(StoreUnavailable) as refused:
            call()
        assert refused.value.retry_after_s and refused.value.status == 503
        assert stopped not in refused.value.message and bucket not in refused.value.message
    assert time.monotonic() - started < 30
