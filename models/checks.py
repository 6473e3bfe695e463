"""Checks of a model before it is deployed (``mediagate models add`` / ``swap``): its
pipeline class exists, its weights are where its source says, and some node of the
cluster can place one of its replicas. Each returns what is wrong, in words; an empty
list means go. Nothing here loads weights.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mediagate.protocol.catalog import ModelSpec
from models.tiny import MODEL_INDEX, TINY_BUILDERS


def pipeline_class_problems(spec: ModelSpec) -> list[str]:
    if spec.source.startswith("simulated://"):
        return []
    known = diffusers_pipeline_classes()
    if not known:
        return ["diffusers is not installed where this command runs"]
    if spec.pipeline_class not in known:
        return [f"diffusers has no pipeline class {spec.pipeline_class!r}"]
    return []


# Exported names with "Pipeline" in them that are no pipeline one can load.
NOT_PIPELINES = ("Output", "Config", "Blocks", "Mixin")


@functools.cache
def diffusers_pipeline_classes() -> frozenset[str]:
    """The pipeline classes the installed diffusers exports, read from its package's
    lazy import table without importing it: ``import diffusers`` imports torch (~6 s
    of CPU), which a ``mediagate models add`` on a serving node would take from the
    models serving there. Every name in that table that names a loadable pipeline
    (not an output, a config, the modular pipelines' blocks)."""
    found = importlib.util.find_spec("diffusers")
    if found is None or found.origin is None:
        return frozenset()
    table = ast.parse(Path(found.origin).read_text(encoding="utf-8"))
    return frozenset(
        node.value
        for node in ast.walk(table)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.isidentifier()
        and "Pipeline" in node.value
        and "Modular" not in node.value
        and not node.value.endswith(NOT_PIPELINES)
    )


def weights_problems(spec: ModelSpec, *, s3: Any = None) -> list[str]:
    """Whether the weights ``spec.source`` names are there: a known tiny model, a local
    pipeline directory, an S3 prefix holding ``model_index.json``, a Hub id in the
    cache (offline) or on the Hub."""
    source = spec.source
    if source.startswith("simulated://"):
        return []
    if source.startswith("tiny://"):
        name = source.removeprefix("tiny://")
        if name not in TINY_BUILDERS:
            return [f"unknown tiny model {name!r}; known: {', '.join(sorted(TINY_BUILDERS))}"]
        return []
    if source.startswith("s3://"):
        return _s3_problems(source, s3)
    if source.startswith("hf://"):
        return _hub_problems(source.removeprefix("hf://"))
    path = Path(source.removeprefix("file://")).expanduser()
    if not (path / MODEL_INDEX).is_file():
        return [f"{path} is not a diffusers pipeline directory (no {MODEL_INDEX})"]
    return _index_problems(json.loads((path / MODEL_INDEX).read_text()), str(path))


def _index_problems(index: Mapping[str, Any], where: str) -> list[str]:
    if not isinstance(index, Mapping) or "_class_name" not in index:
        return [f"{where}/{MODEL_INDEX} names no pipeline class (_class_name)"]
    return []


def _s3_problems(source: str, s3: Any) -> list[str]:
    bucket, _, prefix = source.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    if not bucket or not prefix:
        return [f"expected s3://BUCKET/PREFIX, got {source!r}"]
    if s3 is None:
        from mediagate.stores.artifacts import s3_client

        s3 = s3_client(endpoint_url=os.environ.get("MEDIAGATE_S3_ENDPOINT_URL"))
    try:
        answer = s3.get_object(Bucket=bucket, Key=f"{prefix}/{MODEL_INDEX}")
        index = json.loads(answer["Body"].read())
    except Exception as error:  # absent, no access, endpoint down: all say "not there"
        return [f"cannot read {source}/{MODEL_INDEX}: {error}"]
    return _index_problems(index, source)


def _hub_problems(hub_id: str) -> list[str]:
    repo, _, revision = hub_id.partition("@")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        import huggingface_hub
    except ImportError:  # pragma: no cover - a dependency of diffusers
        return []
    if offline:
        cached = huggingface_hub.try_to_load_from_cache(
            repo, MODEL_INDEX, revision=revision or None
        )
        if not isinstance(cached, str):
            return [
                f"HF_HUB_OFFLINE is set and {repo} is not in the Hugging Face cache; "
                f"pre-fetch it with `huggingface-cli download {repo}`"
            ]
        return []
    try:
        huggingface_hub.hf_hub_download(repo, MODEL_INDEX, revision=revision or None)
    except Exception as error:
        return [f"cannot read {MODEL_INDEX} of {repo} from the Hugging Face Hub: {error}"]
    return []


def placement_problems(
    options: Mapping[str, Any], nodes: Iterable[Mapping[str, float]]
) -> list[str]:
    """Whether some node's total resources can hold one replica asking ``options``
    (Ray ``ray_actor_options``: num_cpus, num_gpus, accelerator_type, resources)."""
    wanted: dict[str, float] = {
        "CPU": float(options.get("num_cpus", 1) or 0),
        "GPU": float(options.get("num_gpus", 0) or 0),
        **{name: float(amount) for name, amount in (options.get("resources") or {}).items()},
    }
    if options.get("accelerator_type"):
        wanted[f"accelerator_type:{options['accelerator_type']}"] = 0.001
    wanted = {name: amount for name, amount in wanted.items() if amount > 0}
    nodes = list(nodes)
    if any(all(node.get(name, 0) >= amount for name, amount in wanted.items()) for node in nodes):
        return []
    offered = sorted({name for node in nodes for name in node if name.startswith("accelerator")})
    asked = ", ".join(f"{name} {amount:g}" for name, amount in wanted.items())
    hint = "; run on CPUs with --gpus 0" if wanted.get("GPU") else ""
    return [
        f"no node of the cluster offers {asked} (nodes offer: "
        f"{', '.join(offered) or 'no accelerator types'}){hint}"
    ]
