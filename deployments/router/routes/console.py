"""The web console's static files: the playground and gallery at ``/``, the operations
view at ``/ops`` (``deployments/router/console/``). No server-side rendering, no
templates, nothing from a CDN: the pages call the public API with the key the user
pasted (sent only as a bearer token). A strict Content-Security-Policy allows only
these files' scripts and styles, so nothing injected into a page can run."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from mediagate.protocol.errors import NotFound

PAGES = {"/": "index.html", "/ops": "ops.html"}
ASSETS = {
    "common.js": "text/javascript",
    "playground.js": "text/javascript",
    "ops.js": "text/javascript",
    "style.css": "text/css",
}
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        # stored images may come from S3's presigned URLs; videos play from blobs
        "img-src 'self' data: blob: http: https:; media-src 'self' blob:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _read(name: str) -> bytes:
    return resources.files("deployments.router").joinpath("console", name).read_bytes()


_FILES = {name: _read(name) for name in [*PAGES.values(), *ASSETS]}


def _page(name: str) -> Response:
    return Response(_FILES[name], media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@router.get("/")
async def playground() -> Response:
    return _page(PAGES["/"])


@router.get("/ops")
async def operations() -> Response:
    return _page(PAGES["/ops"])


@router.get("/console/{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise NotFound(f"no console file {name!r}", param="name")
    return Response(_FILES[name], media_type=ASSETS[name], headers=SECURITY_HEADERS)
