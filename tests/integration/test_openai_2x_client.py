"""The openai client 2.x (the previous major version, installed apart by
scripts/install.sh into .venv/openai-2) against the real service: generations, edits
with and without a mask, a list of images, and streams of both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import RunningService

ROOT = Path(__file__).resolve().parents[2]
OPENAI_2 = ROOT / ".venv" / "openai-2"


def test_the_openai_2x_client_generates_edits_and_streams(service: RunningService) -> None:
    assert (OPENAI_2 / "openai").is_dir(), "run scripts/install.sh dev: it installs openai 2.x"
    session = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("openai_2x_session.py")),
            service.base_url,
            service.key,
        ],
        env={**os.environ, "PYTHONPATH": str(OPENAI_2)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert session.returncode == 0, session.stderr[-3000:]
    findings = json.loads(session.stdout.strip().splitlines()[-1])
    assert findings["version"].startswith("2.")
    assert findings["generated"] == [[64, 48], [64, 48]]
    assert findings["edited"] == [[96, 64]]  # size auto: the photo's
    assert findings["inpainted"] == [[96, 64]]
    assert findings["two_images"] == [400, "image"]  # one image per edit for this model
    assert findings["streamed"] == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"
    ]
    assert findings["edit_streamed"] == ["image_edit.partial_image", "image_edit.completed"]
