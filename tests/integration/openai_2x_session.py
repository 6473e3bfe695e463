"""What a user of the openai client 2.x does against mediagate: run in a subprocess
whose PYTHONPATH puts the 2.x client (installed apart, in .venv/openai-2) first.
Usage: python openai_2x_session.py BASE_URL API_KEY. Prints one JSON line of findings."""

from __future__ import annotations

import base64
import io
import json
import sys

import openai
from PIL import Image


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def size_of(b64: str | None) -> tuple[int, int]:
    assert b64 is not None
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def main() -> None:
    base_url, key = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)
    photo = png(Image.new("RGB", (96, 64), (30, 120, 200)))
    mask_image = Image.new("RGBA", (96, 64), (0, 0, 0, 255))
    mask_image.paste((0, 0, 0, 0), (24, 16, 72, 48))
    mask = png(mask_image)
    findings: dict[str, object] = {"version": openai.__version__}

    generated = client.images.generate(model="tiny-sd", prompt="a boat", n=2, size="64x48")
    findings["generated"] = [size_of(image.b64_json) for image in generated.data or []]

    edited = client.images.edit(image=("photo.png", photo, "image/png"), prompt="at night")
    findings["edited"] = [size_of(image.b64_json) for image in edited.data or []]

    inpainted = client.images.edit(
        image=("photo.png", photo, "image/png"),
        mask=("mask.png", mask, "image/png"),
        prompt="a red balloon",
    )
    findings["inpainted"] = [size_of(image.b64_json) for image in inpainted.data or []]

    try:
        client.images.edit(
            image=[("a.png", photo, "image/png"), ("b.png", photo, "image/png")], prompt="both"
        )
    except openai.BadRequestError as error:
        body = error.body if isinstance(error.body, dict) else {}
        findings["two_images"] = [error.status_code, body.get("param")]

    stream = client.images.generate(
        model="tiny-sd", prompt="a door", size="64x64", stream=True, partial_images=2
    )
    findings["streamed"] = [event.type for event in stream]

    edit_stream = client.images.edit(
        image=("photo.png", photo, "image/png"), prompt="at dawn", stream=True, partial_images=1
    )
    findings["edit_streamed"] = [event.type for event in edit_stream]
    print(json.dumps(findings))


if __name__ == "__main__":
    main()
