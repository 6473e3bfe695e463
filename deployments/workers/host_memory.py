"""A model's loaded pipeline kept in its node's host memory, for the next replica there.

A replica that loads from files reads, parses and builds every component. A replica
whose model has loaded on the same node before can instead take the built pipeline
from host memory: a warm standby that outlives the replicas (scaled to zero, restarted,
or the old version of a swap).

- **Where**: Ray's object store, the node's shared memory. One keeper per node (a
  detached actor with no CPU, named after its node) owns each kept pipeline: the
  replica that loaded it hands it over, and the keeper puts it in the store itself
  (Ray 2.56 removed ``ray.put(_owner=...)``), so the copy stays when that replica
  stops, and goes when the keeper drops it.
- **What**: the pipeline as ``from_pretrained`` built it, on the CPU, in the dtype
  the replica uses (part of the key, with the model id, version and source), before
  it moves to its device. A replica taking it gets a copy of its own (one memory copy
  out of shared memory), then moves it to its device as a file load would.
- **Bounded**: the keeper holds at most ``capacity_bytes`` (by default half the
  node's object store); adding beyond drops the least recently used first. A model
  larger than that is not kept.
- **Opt in** per model: the catalog's ``host_memory: true``. It costs host memory the
  size of the weights on every node where the model has run.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mediagate.protocol.catalog import ModelSpec
from models.device import Placement, choose_placement
from models.loading import on_device, read_pipeline

logger = logging.getLogger(__name__)

NAMESPACE = "mediagate"
KEEPER_PREFIX = "mediagate-host-memory-"
OBJECT_STORE_SHARE = 0.5


class HostMemory:
    """A node's kept pipelines: key -> (object, size), least recently used first."""

    def __init__(self, capacity_bytes: int, store: Callable[[Any], Any] | None = None) -> None:
        """``store``: how a kept pipeline is stored (``ray.put`` unless a test says)."""
        self.capacity_bytes = capacity_bytes
        self._store = store
        self._kept: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._taken: dict[str, int] = {}

    def find(self, key: str) -> list[Any]:
        """The kept object of ``key`` in a list (so that Ray hands back the reference,
        not the pipeline), or an empty list."""
        if key not in self._kept:
            return []
        self._kept.move_to_end(key)
        self._taken[key] = self._taken.get(key, 0) + 1
        return [self._kept[key][0]]

    def room_for(self, size_bytes: int) -> bool:
        return size_bytes <= self.capacity_bytes

    def keep(self, key: str, pipeline: Any, size_bytes: int) -> list[str]:
        """Hold ``pipeline`` under ``key`` (in the object store, owned here); the keys
        dropped to make room."""
        self._kept.pop(key, None)
        dropped = []
        while self._kept and self.held_bytes() + size_bytes > self.capacity_bytes:
            old, _ = self._kept.popitem(last=False)
            self._taken.pop(old, None)
            dropped.append(old)
        self._kept[key] = ((self._store or _ray_put)(pipeline), size_bytes)
        return dropped

    def forget(self, key: str) -> bool:
        self._taken.pop(key, None)
        return self._kept.pop(key, None) is not None

    def held_bytes(self) -> int:
        return sum(size for _, size in self._kept.values())

    def held(self) -> dict[str, dict[str, int]]:
        """Per key: its bytes, and how many replicas have taken it (for operators)."""
        return {
            key: {"bytes": size, "taken": self._taken.get(key, 0)}
            for key, (_, size) in self._kept.items()
        }


def _ray_put(value: Any) -> Any:
    import ray

    return ray.put(value)


def host_key(spec: ModelSpec, placement: Placement) -> str:
    return f"{spec.id}@{spec.version}:{spec.source}:{placement.dtype}"


def pipeline_bytes(pipeline: Any) -> int:
    """The bytes of every parameter and buffer of the pipeline's torch components."""
    import torch

    total = 0
    for component in getattr(pipeline, "components", {}).values():
        if isinstance(component, torch.nn.Module):
            tensors = [*component.parameters(), *component.buffers()]
            total += sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    return total


def node_keeper() -> Any:
    """This node's keeper: found by name, or started (it lives as long as the cluster)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = ray.get_runtime_context().get_node_id()
    name = KEEPER_PREFIX + node_id
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:  # none yet on this node
        pass
    keeper_class: Any = ray.remote(HostMemory)
    return keeper_class.options(
        name=name,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,  # another replica may start it meanwhile
        num_cpus=0,
        max_concurrency=1,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(int(_object_store_bytes(node_id) * OBJECT_STORE_SHARE))


def _object_store_bytes(node_id: str) -> float:
    import ray

    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return float(node["Resources"].get("object_store_memory", 0))
    return 0.0


def load_through_host_memory(
    spec: ModelSpec, *, cache_dir: Path, placement: Placement | None = None
) -> Any:
    """``spec``'s pipeline from this node's host memory when kept there, else from its
    files (then kept for the next replica); on its device either way. Host memory only
    ever saves time: a keeper that cannot be reached, or fails, means files."""
    import ray

    placement = placement or choose_placement(spec.dtype)
    key = host_key(spec, placement)
    started = time.perf_counter()
    try:
        keeper = node_keeper()
        found = ray.get(keeper.find.remote(key))
        pipeline = ray.get(found[0]) if found else None
    except Exception as error:  # a dead keeper, an object lost, one that will not unpickle
        logger.warning("%s: host memory unavailable (%s); loading from files", spec.id, error)
        return on_device(
            read_pipeline(spec, cache_dir=cache_dir, placement=placement), placement, spec
        )
    if pipeline is not None:
        logger.info("%s taken from host memory in %.2fs", spec.id, time.perf_counter() - started)
        return on_device(pipeline, placement, spec)
    pipeline = read_pipeline(spec, cache_dir=cache_dir, placement=placement)
    size = pipeline_bytes(pipeline)
    try:
        if ray.get(keeper.room_for.remote(size)):
            dropped = ray.get(keeper.keep.remote(key, pipeline, size))
            logger.info("%s kept in host memory (%d MB); dropped %s", spec.id, size >> 20, dropped)
    except Exception as error:  # a keeper gone, a pipeline that does not pickle
        logger.warning("%s: not kept in host memory (%s)", spec.id, error)
    return on_device(pipeline, placement, spec)
