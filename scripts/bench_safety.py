"""What provenance and moderation cost per image, and their share of a tiny-model request.

1. Signing: a C2PA manifest (the local test certificate, ES256, no thumbnail) embedded
   in PNG, JPEG and WebP images at 64x64 and 1024x1024, and in an MP4 of 33 frames at
   64x64 (tiny-wan's 4 s): ms per file (p50, p99) and the bytes it adds.
2. Moderation: the prompt check (the shipped term list) per prompt, and the shipped image
   checker (NudeNet's ONNX detector on the CPU) per image at 64x64 and 1024x1024.
3. Share: both against one tiny-sd image (64x64, 4 steps: the pipeline call and the PNG
   encoding, in this process with one torch thread, as a worker replica runs it).
4. Hand-over: what a router pays to have an image encoded in its image process rather
   than in its own thread (the pixels there, the file back), at 64x64 and 1024x1024.

Everything runs on the CPU, one thing at a time, in this process (and, for 4, in one
image process). Last line: one JSON object.
Usage: python scripts/bench_safety.py [--repeats 30] [--smoke]
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarking import percentile

from mediagate.moderation.images import load_image_checker
from mediagate.moderation.prompts import flagged_categories, load_prompt_terms
from mediagate.provenance.certificates import local_certificate_pem
from mediagate.provenance.settings import ProvenanceSettings
from mediagate.provenance.signing import ContentSigner, Provenance

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def timed(call: Callable[[], Any], repeats: int) -> dict[str, float]:
    call()  # warm
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "p99_ms": round(percentile(samples, 99), 3),
    }


def picture(size: int) -> Any:
    """A photo-like image (smooth gradients and noise), not a flat colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(size)
    ramp = np.linspace(0, 255, size)
    base = np.stack(
        [np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), ramp[:, None] + 0 * ramp], -1
    )
    noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype("uint8")
    return Image.fromarray(noisy)


def encoded(image: Any, file_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(
        buffer, PIL_FORMATS[file_format], **({} if file_format == "png" else {"quality": 90})
    )
    return buffer.getvalue()


def tiny_sd_request_ms(repeats: int) -> dict[str, float]:
    """One 64x64 tiny-sd image: the pipeline call and its PNG encoding."""
    import torch

    from models.catalog import load_catalog
    from models.loading import load_pipeline

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as cache:
        pipeline = load_pipeline(load_catalog().models["tiny-sd"], cache_dir=Path(cache))

        def one() -> None:
            image = pipeline(
                prompt="a lighthouse at dusk",
                width=64,
                height=64,
                num_inference_steps=4,
                guidance_scale=7.5,
                generator=torch.Generator().manual_seed(1),
                output_type="pil",
            ).images[0]
            encoded(image, "png")

        return timed(one, repeats)


def hand_over_ms(repeats: int) -> dict[str, Any]:
    """A PNG made by the router's image process against one made in its thread."""
    import asyncio

    from deployments.router.image_processing import Encoding, ImageProcessing
    from mediagate.moderation.moderator import Moderator
    from mediagate.moderation.settings import ModerationSettings
    from mediagate.protocol.work import RawImage
    from models.encoding import to_raw_image

    off = ModerationSettings(enabled=False)
    in_threads = ImageProcessing.in_threads(Moderator(off), None)
    in_processes = ImageProcessing.in_processes(1, off, None)
    figures: dict[str, Any] = {}
    try:
        for size in (64, 1024):
            raw = to_raw_image(picture(size))
            for name, where in (("thread", in_threads), ("process", in_processes)):

                def encode(where: ImageProcessing = where, raw: RawImage = raw) -> bytes:
                    return asyncio.run(where.encode(raw, Encoding("png"), None))

                figures[f"{name}_{size}"] = timed(encode, repeats)
            figures[f"added_p50_ms_{size}"] = round(
                figures[f"process_{size}"]["p50_ms"] - figures[f"thread_{size}"]["p50_ms"], 3
            )
    finally:
        in_processes.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="a few repeats: checks it runs")
    args = parser.parse_args()
    repeats = 2 if args.smoke else args.repeats

    chain, key = local_certificate_pem()
    signer = ContentSigner(ProvenanceSettings(), chain, key)
    provenance = Provenance(model="tiny-sd")
    signing: dict[str, Any] = {}
    for size in (64, 1024):
        image = picture(size)
        for file_format in PIL_FORMATS:
            data = encoded(image, file_format)
            signed = signer.sign(data, file_format, provenance)
            signing[f"{file_format}_{size}"] = {
                **timed(functools.partial(signer.sign, data, file_format, provenance), repeats),
                "bytes": len(data),
                "bytes_added": len(signed) - len(data),
            }
    import numpy as np

    from models.encoding import encode_mp4

    frames = (np.random.default_rng(0).random((33, 64, 64, 3)) * 255).astype(np.uint8)
    mp4 = encode_mp4(frames, 8)
    signing["mp4_64_33_frames"] = {
        **timed(lambda: signer.sign(mp4, "mp4", Provenance(model="tiny-wan")), repeats),
        "bytes": len(mp4),
        "bytes_added": len(signer.sign(mp4, "mp4", Provenance(model="tiny-wan"))) - len(mp4),
    }

    terms = load_prompt_terms()
    prompt = "a lighthouse at dusk on a rocky coast, oil painting, warm light " * 4
    prompt_check = timed(lambda: flagged_categories(prompt, terms, "auto"), max(repeats, 200))
    checker = load_image_checker("nudenet")
    assert checker is not None
    image_check = {}
    for size in (64, 1024):
        image = picture(size)
        image_check[f"nudenet_{size}"] = timed(
            functools.partial(checker.check, [image], "auto"), repeats
        )

    hand_over = hand_over_ms(repeats)
    request = tiny_sd_request_ms(max(3, repeats // 3))
    added_ms = signing["png_64"]["p50_ms"] + image_check["nudenet_64"]["p50_ms"]
    result = {
        "signing": signing,
        "moderation": {"prompt_check": prompt_check, **image_check},
        "tiny_sd_request_64": request,
        "share_of_tiny_sd_request": {
            "signing_png_64": round(signing["png_64"]["p50_ms"] / request["p50_ms"], 4),
            "image_check_64": round(image_check["nudenet_64"]["p50_ms"] / request["p50_ms"], 4),
            "prompt_check": round(prompt_check["p50_ms"] / request["p50_ms"], 5),
            "both": round(added_ms / request["p50_ms"], 4),
        },
        "image_process_hand_over": hand_over,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
