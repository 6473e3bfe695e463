"""The layers point one way and nothing imports in a circle (docs/ARCHITECTURE.md).

Every import of every first-party module counts: at the top, inside functions, and
under ``TYPE_CHECKING`` (a cycle there is still a cycle for a reader).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mediagate", "models", "autoscaling", "deployments", "simulation")

# Layer -> the layers it may import (besides itself). Longest prefix names the layer.
ALLOWED: dict[str, set[str]] = {
    "mediagate.protocol": set(),
    "mediagate.stores": {"mediagate.protocol"},
    "mediagate.access": {"mediagate.protocol", "mediagate.stores"},
    "mediagate.webhooks": {"mediagate.protocol", "mediagate.stores"},
    "mediagate.provenance": {"mediagate.protocol"},
    "mediagate.moderation": {"mediagate.protocol"},
    "mediagate.jobs": {
        "mediagate.protocol",
        "mediagate.stores",
        "mediagate.access",
        "mediagate.webhooks",
    },
    "mediagate.settings": {"mediagate.protocol", "mediagate.stores"},
    "models": {"mediagate.protocol", "mediagate.stores", "mediagate.settings"},
    "autoscaling": {"mediagate.protocol"},
    # The schedulers' policies, which the surge simulator drives too.
    "deployments.scheduler": {
        "mediagate.protocol",
        "mediagate.stores",
        "mediagate.access",
        "mediagate.jobs",
        "mediagate.webhooks",
        "mediagate.settings",
        "models",
        "autoscaling",
        "deployments",
    },
    "deployments": {
        "deployments.scheduler",
        "mediagate.protocol",
        "mediagate.stores",
        "mediagate.access",
        "mediagate.jobs",
        "mediagate.webhooks",
        "mediagate.provenance",
        "mediagate.moderation",
        "mediagate.settings",
        "models",
        "autoscaling",
    },
    "mediagate.cli": {
        "mediagate.protocol",
        "mediagate.stores",
        "mediagate.access",
        "mediagate.jobs",
        "mediagate.webhooks",
        "mediagate.provenance",
        "mediagate.moderation",
        "mediagate.settings",
        "models",
        "autoscaling",
    },
    # The surge simulator drives the real policies: schedulers' decisions, quota, the
    # autoscaling policy; no deployment class (nothing of Serve's processes).
    "simulation": {
        "mediagate.protocol",
        "mediagate.access",
        "mediagate.stores",
        "autoscaling",
        "deployments.scheduler",
    },
    "mediagate": set(),  # the package's own __init__
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def imported(path: Path, known: set[str]) -> Iterator[str]:
    """The first-party modules ``path`` imports (``from a.b import c`` counts ``a.b.c``
    when that is a module, else ``a.b``)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                yield full if full in known else node.module


def layer(module: str) -> str:
    return max(
        (name for name in ALLOWED if module == name or module.startswith(f"{name}.")),
        key=len,
    )


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {module: set(imported(path, known)) - {module} for module, path in found.items()}


def test_every_import_goes_down_the_layers() -> None:
    wrong = sorted(
        f"{module} ({layer(module)}) imports {target} ({layer(target)})"
        for module, targets in graph().items()
        for target in targets
        if layer(target) != layer(module) and layer(target) not in ALLOWED[layer(module)]
    )
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target in edges and target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_no_source_file_over_400_lines() -> None:
    long = {
        module: len(path.read_text().splitlines())
        for module, path in modules().items()
        if len(path.read_text().splitlines()) > 400
    }
    assert not long, long
