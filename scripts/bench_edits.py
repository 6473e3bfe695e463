"""What edits cost: the memory of a worker that serves text-to-image, image-to-image and
inpaint from one loaded model against one that serves text-to-image alone, and the
router's time to refuse an upload that must not be decoded.

1. Memory. Two fresh processes load the tiny Stable Diffusion worker, one with the
   catalog entry's edit tasks taken out, one with them; each then runs one request of
   every task it serves. Reported: the bytes of the distinct weight tensors reachable
   from all its pipelines (sharing through ``from_pipe`` makes them equal), and the
   process's RSS after loading and after the requests. Target: within 5%.
2. Refusals. The router app in-process (real stores, a scheduler that would answer at
   once) is sent uploads refused by their headers: a PNG declaring 20000x20000, a
   4096x4096 lossless WebP of a few hundred bytes, a mask of the wrong size, a file that
   is no image. Reported per kind: the router's own handling time
   (``x-mediagate-handled-ms``, from the request's arrival to the answer) at p50/p99/max.
3. Streaming. One 20-step image with ``partial_images: 3`` against the same image
   unstreamed, on the worker in a fresh process: what the previews (three VAE decodes)
   cost, and when the first one comes, as a share of the unstreamed image's time.

Last line: one JSON object. Usage: python scripts/bench_edits.py [--requests 200] [--smoke]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarking import percentile

MEMORY_PROBE = r"""
import json, sys
import psutil
import numpy as np
from models.catalog import load_catalog
from deployments.workers.text_to_image import TextToImage, generate_batch
from mediagate.protocol.work import ImageJob
from models.uploads import edit_input, inpaint_mask
from PIL import Image

with_edits = sys.argv[1] == "edits"
spec = load_catalog().models["tiny-sd"]
if not with_edits:
    spec = spec.model_copy(update={"tasks": ["text-to-image"]})
worker = TextToImage(spec, cache_dir=sys.argv[2], torch_threads=1)
process = psutil.Process()
loaded_mb = process.memory_info().rss / 2**20
seen, weight_bytes = set(), 0
for pipeline in worker.pipelines.values():
    for component in pipeline.components.values():
        for tensor in getattr(component, "state_dict", dict)().values():
            key = tensor.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                weight_bytes += tensor.untyped_storage().nbytes()
photo = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
mask.paste((0, 0, 0, 0), (16, 16, 48, 48))
base = dict(request_id="r", prompt="x", width=64, height=64, num_inference_steps=4,
            guidance_scale=7.5, num_images_per_prompt=1, seed=1, output_format="png")
source, hole = edit_input(photo, 64, 64), inpaint_mask(mask, 64, 64)
jobs = {"text-to-image": {}, "image-to-image": {"strength": 0.8, "init_image": source},
        "inpaint": {"strength": 1.0, "init_image": source, "mask_image": hole}}
for task, fields in jobs.items():
    if task in worker.pipelines:
        generate_batch(worker.pipelines[task], [ImageJob(**base, task=task, **fields)])
print(json.dumps({"tasks": sorted(worker.pipelines), "weight_mb": weight_bytes / 2**20,
                  "rss_loaded_mb": loaded_mb, "rss_after_mb": process.memory_info().rss / 2**20}))
"""


def memory(cache_dir: str) -> dict[str, Any]:
    figures = {}
    for kind in ("alone", "edits"):
        probe = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, kind, cache_dir],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        figures[kind] = json.loads(probe.stdout.strip().splitlines()[-1])
    alone, edits = figures["alone"], figures["edits"]
    return {
        "tasks_alone": alone["tasks"],
        "tasks_with_edits": edits["tasks"],
        "weight_mb": {"alone": round(alone["weight_mb"], 3), "edits": round(edits["weight_mb"], 3)},
        "weight_ratio": round(edits["weight_mb"] / alone["weight_mb"], 4),
        "rss_after_mb": {k: round(v["rss_after_mb"], 1) for k, v in figures.items()},
        "rss_ratio": round(edits["rss_after_mb"] / alone["rss_after_mb"], 4),
    }


def refusal_uploads() -> dict[str, list[tuple[str, tuple[str, bytes]]]]:
    import struct
    import zlib

    from PIL import Image

    def encoded(image: Any, **options: Any) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, **options)
        return buffer.getvalue()

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    huge = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    huge_png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", huge) + chunk(b"IDAT", zlib.compress(b"\0"))
    bomb = encoded(Image.new("RGB", (4096, 4096), (1, 2, 3)), format="WEBP", lossless=True)
    photo = encoded(Image.new("RGB", (64, 64), (9, 9, 9)), format="PNG")
    small_mask = encoded(Image.new("RGBA", (32, 32)), format="PNG")
    png_bomb = encoded(Image.new("1", (20000, 20000)), format="PNG", optimize=True)
    return {
        "png_20000x20000_header": [("image", ("big.png", huge_png))],
        f"png_bomb_20000x20000_{len(png_bomb)}_bytes": [("image", ("bomb.png", png_bomb))],
        f"webp_4096x4096_{len(bomb)}_bytes": [("image", ("bomb.webp", bomb))],
        "mask_of_the_wrong_size": [("image", ("a.png", photo)), ("mask", ("m.png", small_mask))],
        "not_an_image": [("image", ("a.png", b"%PDF-1.7 not an image"))],
        "17_images": [("image[]", (f"{i}.png", photo)) for i in range(17)],
    }


def refusals(requests: int) -> dict[str, Any]:
    from tests.unit.harness import Service

    with tempfile.TemporaryDirectory() as scratch:
        service = Service(Path(scratch))
        figures: dict[str, Any] = {}
        for kind, files in refusal_uploads().items():
            handled = []
            for _ in range(requests):
                response = service.client.post(
                    "/v1/images/edits", files=files, data={"prompt": "x"}, headers=service.auth
                )
                assert response.status_code in (400, 413), response.text
                handled.append(float(response.headers["x-mediagate-handled-ms"]))
            figures[kind] = {
                "p50_ms": round(percentile(handled, 50), 2),
                "p99_ms": round(percentile(handled, 99), 2),
                "max_ms": round(max(handled), 2),
            }
        assert service.scheduler.jobs == [], "a refused upload reached the scheduler"
    return figures


STREAM_PROBE = r"""
import asyncio, json, sys, time
from models.catalog import load_catalog
from deployments.workers.text_to_image import TextToImage
from mediagate.protocol.work import ImageJob, PartialImage

worker = TextToImage(load_catalog().models["tiny-sd"], cache_dir=sys.argv[1], torch_threads=1)
rounds = int(sys.argv[2])

async def one(partial_images):
    job = ImageJob(request_id="s", prompt="a lighthouse", width=64, height=64,
                   num_inference_steps=20, guidance_scale=7.5, num_images_per_prompt=1,
                   seed=1, output_format="png", partial_images=partial_images)
    started, first = time.perf_counter(), None
    async for item in worker.generate_streaming([job]):
        if isinstance(item, PartialImage) and first is None:
            first = time.perf_counter() - started
    return first, time.perf_counter() - started

async def main():
    plain, streamed, firsts = [], [], []
    for _ in range(rounds):  # interleaved: the machine's drift lands on both sides
        plain.append((await one(0))[1])
        first, total = await one(3)
        streamed.append(total)
        firsts.append(first)
    print(json.dumps({"plain": plain, "streamed": streamed, "first": firsts}))

asyncio.run(main())
"""


def streaming(cache_dir: str, rounds: int) -> dict[str, Any]:
    """What streamed previews cost the worker and how early the first one comes: one
    20-step image with ``partial_images: 3`` (previews after steps 5, 10, 15) against
    the same image unstreamed, interleaved, in a fresh process."""
    probe = subprocess.run(
        [sys.executable, "-c", STREAM_PROBE, cache_dir, str(rounds)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    runs = json.loads(probe.stdout.strip().splitlines()[-1])
    plain = percentile(runs["plain"], 50)
    streamed = percentile(runs["streamed"], 50)
    first = percentile(runs["first"], 50)
    return {
        "steps": 20,
        "partial_images": 3,
        "plain_p50_s": round(plain, 4),
        "streamed_p50_s": round(streamed, 4),
        "previews_cost_ratio": round(streamed / plain, 3),
        "first_partial_p50_s": round(first, 4),
        "first_partial_share_of_plain": round(first / plain, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="refusals per kind")
    parser.add_argument("--smoke", action="store_true", help="a few requests: checks it runs")
    args = parser.parse_args()
    if args.smoke:
        args.requests = 5
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.unit.harness
    with tempfile.TemporaryDirectory() as cache_dir:
        result = {
            "memory": memory(cache_dir),
            "refusals": refusals(args.requests),
            "streaming": streaming(cache_dir, rounds=3 if args.smoke else 30),
        }
    result["weight_within_5pct"] = result["memory"]["weight_ratio"] <= 1.05
    result["rss_within_5pct"] = result["memory"]["rss_ratio"] <= 1.05
    slowest = max(kind["max_ms"] for kind in result["refusals"].values())
    result["refusals_under_50ms"] = slowest < 50
    print(json.dumps(result))


if __name__ == "__main__":
    main()
