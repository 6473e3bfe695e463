"""Reads the model catalog file (YAML) into a `Catalog` of `ModelSpec`s
(`mediagate.protocol.catalog`); relative local sources resolve against the file.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mediagate.protocol.catalog import Catalog, ModelSpec


def parse_catalog(data: dict[str, Any], base_dir: Path | None = None) -> Catalog:
    """Build a catalog from parsed YAML; relative local sources resolve against ``base_dir``."""
    raw_models = data.get("models") or {}
    if not isinstance(raw_models, dict):
        raise ValueError("catalog `models` must be a mapping of model id -> spec")
    models: dict[str, ModelSpec] = {}
    for model_id, entry in raw_models.items():
        fields = dict(entry or {})
        source = str(fields.get("source", ""))
        if (
            base_dir is not None
            and source
            and "://" not in source
            and not Path(source).is_absolute()
        ):
            fields["source"] = str((base_dir / source).resolve())
        models[model_id] = ModelSpec(id=model_id, **fields)
    return Catalog(models=models, default_models=data.get("default_models") or {})


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Read a catalog file; ``None`` reads the catalog shipped with mediagate."""
    if path is None:
        text = resources.files("models").joinpath("catalog.yaml").read_text()
        return parse_catalog(yaml.safe_load(text) or {})
    file = Path(path)
    return parse_catalog(yaml.safe_load(file.read_text()) or {}, base_dir=file.parent)
