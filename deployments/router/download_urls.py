"""The base of download URLs: configured, never chosen by the client.

A request's ``Host`` header is the client's to set; building URLs from it would hand
out download links on any host an attacker names (a link to evil.example that a
victim's client then follows). The router uses the configured public base URL, and
a request's own host only when the operator listed it, or when it is a loopback name
(a request to the machine itself, where no other host can be named).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from deployments.router.settings import RouterSettings

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
FALLBACK_BASE_URL = "http://127.0.0.1"


def download_base_url(request_base_url: str, settings: RouterSettings) -> str:
    """The base URL for download links answering a request made to ``request_base_url``
    (Starlette's ``request.base_url``, built from the Host header)."""
    parts = urlsplit(request_base_url)
    netloc = parts.netloc.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    # Only a plain host[:port] is ever echoed: "evil.example\@allowed" parses as host
    # "allowed" but takes a browser to evil.example.
    plain = bool(netloc) and not any(c in netloc for c in "@\\/?#") and parts.hostname
    host = (parts.hostname or "").lower() if plain else ""
    if plain and (netloc in settings.allowed_hosts or host in settings.allowed_hosts):
        return f"{parts.scheme}://{netloc}"
    if settings.public_base_url is not None:
        return settings.public_base_url
    if plain and host in LOOPBACK_NAMES:
        return f"{parts.scheme}://{netloc}"
    # unconfigured and asked under another name: stay on this machine
    return FALLBACK_BASE_URL + (f":{port}" if port else "")
