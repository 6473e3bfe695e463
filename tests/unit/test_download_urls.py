"""Download URLs never follow a Host header the operator did not list."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest
from pydantic import ValidationError

from deployments.router.download_urls import download_base_url
from deployments.router.settings import RouterSettings
from tests.unit.harness import Service

PUBLIC = RouterSettings(
    public_base_url="https://images.example.com/", allowed_hosts=["alt.example.com"]
)


@pytest.mark.parametrize(
    ("request_base", "settings", "expected"),
    [
        ("http://evil.example/", PUBLIC, "https://images.example.com"),
        ("http://alt.example.com/", PUBLIC, "http://alt.example.com"),
        ("http://ALT.example.com:8443/", PUBLIC, "http://alt.example.com:8443"),
        ("http://127.0.0.1:8000/", PUBLIC, "https://images.example.com"),
        ("http://127.0.0.1:8000/", RouterSettings(), "http://127.0.0.1:8000"),
        ("http://localhost:9000/", RouterSettings(), "http://localhost:9000"),
        ("http://evil.example/", RouterSettings(), "http://127.0.0.1"),
        ("http://evil.example:8000/", RouterSettings(), "http://127.0.0.1:8000"),
        ("http://evil.example\\@alt.example.com/", PUBLIC, "https://images.example.com"),
        ("http://user@alt.example.com/", PUBLIC, "https://images.example.com"),
        ("http://evil.example\\@localhost/", RouterSettings(), "http://127.0.0.1"),
    ],
)
def test_the_base_is_configured_or_a_listed_or_loopback_host(
    request_base: str, settings: RouterSettings, expected: str
) -> None:
    assert download_base_url(request_base, settings) == expected


@pytest.mark.parametrize("bad", ["ftp://x", "images.example.com", "https://x/?a=1", "https://"])
def test_a_public_base_url_must_be_an_absolute_http_url(bad: str) -> None:
    with pytest.raises(ValidationError, match="public_base_url"):
        RouterSettings(public_base_url=bad)


def test_a_foreign_host_header_gets_urls_on_the_public_base(tmp_path: Path) -> None:
    service = Service(tmp_path, public_base_url="https://images.example.com")
    answer = service.client.post(
        "/v1/images/generations",
        json={"prompt": "x", "response_format": "url"},
        headers={**service.auth, "Host": "evil.example"},
    )
    assert answer.status_code == 200, answer.text
    url = urlsplit(answer.json()["data"][0]["url"])
    assert (url.scheme, url.netloc) == ("https", "images.example.com")
    assert "evil" not in answer.text
