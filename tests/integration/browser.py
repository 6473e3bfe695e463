"""Headless Chromium for the console's tests: Debian's binary driven by playwright (no
browser download), pages watched for every request and script error they make."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
TIMEOUT_MS = 120_000
# Keeps the field names of every multipart form the page sends (a test's view only).
RECORD_FORMS = """
window.__forms = [];
const sendFetch = window.fetch;
window.fetch = (url, options) => {
  if (options && options.body instanceof FormData) {
    window.__forms.push([...options.body.keys()]);
  }
  return sendFetch(url, options);
};
"""


@contextmanager
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "chromium is missing: scripts/test.sh installs it"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        try:
            yield launched
        finally:
            launched.close()


class Watched:
    """A page, with every API request it sends and every script error it raises."""

    def __init__(self, browser: Any) -> None:
        self.page = browser.new_page(viewport={"width": 1200, "height": 900})
        self.page.add_init_script(RECORD_FORMS)
        self.page.set_default_timeout(TIMEOUT_MS)
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("request", lambda r: self.requests.append((r.url, r.headers)))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("dialog", self._dialog)

    def _dialog(self, dialog: Any) -> None:  # an alert() a page must never show
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def sign_in(self, url: str, key: str) -> None:
        self.page.goto(url)
        self.page.fill("#key", key)
        self.page.click("#sign-in-form button")
        self.page.wait_for_selector("#app:not([hidden])")

    def check_key_handling(self, key: str) -> None:
        api_calls = [(url, headers) for url, headers in self.requests if "/v1/" in url]
        assert api_calls
        for url, headers in api_calls:
            assert key not in url, url
            if "/v1/files/" not in url:  # signed downloads need no key
                assert headers.get("authorization") == f"Bearer {key}", url
        assert self.page.evaluate("document.cookie") == ""
        assert self.page.evaluate("localStorage.length") == 0
        assert not self.errors, self.errors
        assert not self.dialogs and self.page.evaluate("window.__xss") is None


def plotted(page: Any, model: str, plot: str) -> dict[str, float]:
    found = page.get_attribute(f"[data-model='{model}'] canvas[data-plot='{plot}']", "data-latest")
    return dict(json.loads(found or "{}"))
