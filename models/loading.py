"""Load a catalog model's pipeline, whatever its source, onto the chosen device.

Every real source ends in ``DiffusionPipeline.from_pretrained`` on a directory or
a Hub id; only ``simulated://`` (tests and benchmarks) bypasses diffusers.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from mediagate.protocol.catalog import ModelSpec
from mediagate.protocol.errors import ModelUnavailable
from models.device import Placement, choose_placement
from models.simulated import SimulatedPipeline
from models.tiny import MODEL_INDEX, ensure_tiny_pipeline

logger = logging.getLogger(__name__)


def _pipeline_class(spec: ModelSpec) -> Any:
    import diffusers

    cls = getattr(diffusers, spec.pipeline_class, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ModelUnavailable(
            f"model {spec.id}: diffusers has no pipeline class {spec.pipeline_class!r}"
        )
    return cls


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def resolve_weights(spec: ModelSpec, cache_dir: Path) -> str:
    """The directory (or Hub id) that ``from_pretrained`` should read for ``spec``."""
    source = spec.source
    if source.startswith("tiny://"):
        try:
            return str(ensure_tiny_pipeline(source.removeprefix("tiny://"), cache_dir / "tiny"))
        except ValueError as error:
            raise ModelUnavailable(f"model {spec.id}: {error}") from None
    if source.startswith("hf://"):
        return source.removeprefix("hf://")
    if source.startswith("s3://"):
        try:
            return str(download_s3_weights(source, cache_dir / "s3"))
        except Exception as error:
            raise ModelUnavailable(f"model {spec.id}: cannot fetch {source}: {error}") from error
    path = Path(source.removeprefix("file://")).expanduser()
    if not (path / MODEL_INDEX).exists():
        raise ModelUnavailable(
            f"model {spec.id}: {path} is not a diffusers pipeline directory (no {MODEL_INDEX})"
        )
    return str(path)


def split_revision(hub_id: str) -> tuple[str, str | None]:
    """``org/name@revision`` -> (``org/name``, ``revision``); no ``@``: no revision."""
    name, at, revision = hub_id.partition("@")
    if at and not revision:
        raise ModelUnavailable(f"{hub_id!r}: an empty revision after '@'")
    return name, revision or None


def download_s3_weights(uri: str, cache_root: Path, *, client: Any = None) -> Path:
    """Copy the pipeline directory at ``s3://bucket/prefix`` into the cache, once.

    Safe across processes (a file lock, then an atomic rename of a complete copy).
    The endpoint comes from ``MEDIAGATE_S3_ENDPOINT_URL`` (S3-compatible stores),
    credentials from the usual AWS chain.
    """
    parts = urlsplit(uri)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if not bucket or not prefix:
        raise ValueError(f"expected s3://BUCKET/PREFIX, got {uri!r}")
    target = cache_root / bucket / prefix
    if not _inside(target, cache_root):
        raise ValueError(f"{uri}: the prefix leaves the model cache")
    if (target / MODEL_INDEX).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / MODEL_INDEX).exists():
            return target
        if client is None:
            from mediagate.stores.artifacts import s3_client

            client = s3_client(endpoint_url=os.environ.get("MEDIAGATE_S3_ENDPOINT_URL"))
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            count = 0
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix + "/"):
                for item in page.get("Contents", []):
                    relative = item["Key"][len(prefix) + 1 :]
                    if not relative or relative.endswith("/"):
                        continue
                    destination = staging / relative
                    if not _inside(destination, staging):  # "../x" or "/etc/x" in a key
                        raise ValueError(f"{uri}: object key {item['Key']!r} leaves its folder")
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    client.download_file(bucket, item["Key"], str(destination))
                    count += 1
            if not (staging / MODEL_INDEX).exists():
                raise ValueError(f"{uri} holds {count} files but no {MODEL_INDEX}")
            staging.rename(target)
            logger.info("downloaded %d files of %s into %s", count, uri, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` stays within ``folder`` once ``..`` and links are resolved."""
    return path.resolve().is_relative_to(folder.resolve())


def load_pipeline(spec: ModelSpec, *, cache_dir: Path, placement: Placement | None = None) -> Any:
    """Load ``spec``'s pipeline with ``from_pretrained`` and move it to its device.

    ``hf://`` ids load through the Hugging Face cache; with ``HF_HUB_OFFLINE=1`` only
    cached weights are used, and absent weights raise ``ModelUnavailable`` saying so.
    """
    if spec.source.startswith("simulated://"):
        query = parse_qs(urlsplit(spec.source).query)
        return SimulatedPipeline(
            step_ms=float(query.get("step_ms", ["50"])[0]),
            batch_cost=float(query.get("batch_cost", ["0"])[0]),
        )
    placement = placement or choose_placement(spec.dtype)
    return on_device(read_pipeline(spec, cache_dir=cache_dir, placement=placement), placement, spec)


def read_pipeline(spec: ModelSpec, *, cache_dir: Path, placement: Placement) -> Any:
    """``spec``'s pipeline as ``from_pretrained`` builds it from its files: on the CPU,
    in ``placement``'s dtype."""
    pipeline_class = _pipeline_class(spec)
    weights = resolve_weights(spec, cache_dir)
    is_hub = spec.source.startswith("hf://")
    remote = is_hub or spec.source.startswith("s3://")
    weights, revision = split_revision(weights) if is_hub else (weights, None)
    if is_hub and revision is None:
        logger.warning(
            "model %s: %s is not pinned to a revision (hf://ID@COMMIT); what loads can change",
            spec.id,
            spec.source,
        )
    try:
        pipeline = pipeline_class.from_pretrained(
            weights,
            dtype=placement.torch_dtype(),
            local_files_only=is_hub and _hub_offline(),
            revision=revision,
            # weights from elsewhere load only as safetensors: never a pickle, which runs code
            use_safetensors=True if remote else None,
        )
    except (OSError, ValueError) as error:
        if not is_hub:
            raise ModelUnavailable(f"model {spec.id}: cannot load {weights}: {error}") from error
        hint = (
            "HF_HUB_OFFLINE is set and the weights are not in the Hugging Face cache"
            if _hub_offline()
            else "the weights could not be downloaded from the Hugging Face Hub"
        )
        raise ModelUnavailable(
            f"model {spec.id}: {hint} ({weights}); pre-fetch them with "
            f"`huggingface-cli download {weights}"
            + (f" --revision {revision}" if revision else "")
            + "` or set HF_HOME to a cache that has them"
        ) from error
    logger.info("read %s from %s as %s", spec.id, weights, placement.dtype)
    return pipeline


def on_device(pipeline: Any, placement: Placement, spec: ModelSpec) -> Any:
    """``pipeline`` moved to ``placement``'s device, ready to serve."""
    pipeline = pipeline.to(placement.device)
    pipeline.set_progress_bar_config(disable=True)
    logger.info("loaded %s on %s/%s", spec.id, placement.device, placement.dtype)
    return pipeline
