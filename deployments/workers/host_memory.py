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
  the replica uses (part of the key, with the model id, version, source and pipeline
  class), before it moves to its device. A replica taking it gets a copy of its own
  (one memory copy out of shared memory), then moves it to its device as a file load
  would.
- **Once per node**: the first replica to miss claims the key and hands its pipeline
  over without waiting for the keeper; replicas starting meanwhile load from files and
  hand nothing (a claim not fulfilled within ``CLAIM_S`` lapses).
- **Bounded**: the keeper holds at most ``capacity_bytes`` (by default half the
  node's object store); adding beyond drops the least recently used first. A model
  larger than that is not kept.
- **Never in the way**: every call to the keeper has a timeout, and a keeper that
  fails, hangs or is gone means files.
- **Opt in** per model: the catalog's ``host_memory: true``. It costs host memory the
  size of the weights on every node where the model has run.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mediagate.protocol.catalog import ModelSpec
from models.device import Placement, choose_placement
from models.loading import load_pipeline, on_device, read_pipeline

logger = logging.getLogger(__name__)

NAMESPACE = "mediagate"
KEEPER_PREFIX = "mediagate-host-memory-"
OBJECT_STORE_SHARE = 0.5
KEEPER_TIMEOUT_S = 10.0
CLAIM_S = 900.0  # a large model's read from files, before its hand-over


@dataclass(frozen=True)
class Kept:
    """One kept pipeline, as an operator lists it (``HostMemory.held``)."""

    key: str
    size_bytes: int
    taken: int


class HostMemory:
    """A node's kept pipelines: key -> (object, size), least recently used first; and
    the keys a replica has claimed, loading them to hand over."""

    def __init__(
        self,
        capacity_bytes: int,
        *,
        store: Callable[[Any], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``store``: how a kept pipeline is stored (``ray.put`` unless a test says)."""
        self.capacity_bytes = capacity_bytes
        self._store = store
        self._clock = clock
        self._kept: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._taken: dict[str, int] = {}
        self._claims: dict[str, float] = {}
        self._too_large: set[str] = set()  # (no replica need hand these over again)

    def find_or_claim(self, key: str) -> tuple[list[Any], bool]:
        """The kept object of ``key`` in a list (so that Ray hands back the reference,
        not the pipeline), or an empty list and whether the caller now holds the claim
        to load and hand it over (False: another replica does)."""
        if key in self._kept:
            self._kept.move_to_end(key)
            self._taken[key] = self._taken.get(key, 0) + 1
            return [self._kept[key][0]], False
        now = self._clock()
        if key in self._too_large or now - self._claims.get(key, -CLAIM_S) < CLAIM_S:
            return [], False
        self._claims[key] = now
        return [], True

    def keep(self, key: str, pipeline: Any, size_bytes: int) -> list[str]:
        """Hold ``pipeline`` under ``key`` (in the object store, owned here) unless it is
        larger than the whole keeper; the keys dropped to make room. Stored before
        anything is dropped: a store that fails drops nothing."""
        self._claims.pop(key, None)
        if size_bytes > self.capacity_bytes:
            self._too_large.add(key)
            logger.warning("%s (%d MB) is larger than host memory holds", key, size_bytes >> 20)
            return []
        stored = (self._store or _ray_put)(pipeline)
        self._kept.pop(key, None)
        dropped = []
        while self._kept and self.held_bytes() + size_bytes > self.capacity_bytes:
            old, _ = self._kept.popitem(last=False)
            self._taken.pop(old, None)
            dropped.append(old)
        self._kept[key] = (stored, size_bytes)
        if dropped:
            logger.info("host memory dropped %s to keep %s", dropped, key)
        return dropped

    def forget(self, key: str) -> bool:
        """Drop ``key``; whether it was kept."""
        self._taken.pop(key, None)
        return self._kept.pop(key, None) is not None

    def held_bytes(self) -> int:
        """The bytes of everything kept."""
        return sum(size for _, size in self._kept.values())

    def held(self) -> list[Kept]:
        """Everything kept, least recently used first, with how often each was taken."""
        return [
            Kept(key=key, size_bytes=size, taken=self._taken.get(key, 0))
            for key, (_, size) in self._kept.items()
        ]


def _ray_put(value: Any) -> Any:
    import ray

    return ray.put(value)


def host_key(spec: ModelSpec, placement: Placement) -> str:
    """What makes two loads the same pipeline: the model version, its weights, its
    class and the dtype."""
    return f"{spec.id}@{spec.version}:{spec.source}:{spec.pipeline_class}:{placement.dtype}"


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
    files (then handed to the keeper, when this replica holds the claim); on its
    device either way. Host memory only ever saves time: a keeper that cannot be
    reached, fails or hangs means files."""
    import ray

    if spec.source.startswith("simulated://"):  # nothing to keep
        return load_pipeline(spec, cache_dir=cache_dir, placement=placement)
    placement = placement or choose_placement(spec.dtype)
    key = host_key(spec, placement)
    started = time.perf_counter()
    claimed = False  # (True only with a keeper that answered)
    try:
        keeper = node_keeper()
        found, claimed = ray.get(keeper.find_or_claim.remote(key), timeout=KEEPER_TIMEOUT_S)
        if found:
            pipeline = ray.get(found[0], timeout=KEEPER_TIMEOUT_S)
            logger.info(
                "%s taken from host memory in %.2fs", spec.id, time.perf_counter() - started
            )
            return on_device(pipeline, placement, spec)
    except Exception as error:  # a keeper gone or hung, an object lost or not unpickled
        logger.warning("%s: host memory unavailable (%s); loading from files", spec.id, error)
    pipeline = read_pipeline(spec, cache_dir=cache_dir, placement=placement)
    if claimed:
        try:
            # Not waited for: the arguments are serialized here, before the move.
            keeper.keep.remote(key, pipeline, pipeline_bytes(pipeline))
        except Exception as error:  # a pipeline that does not pickle
            logger.warning("%s: not kept in host memory (%s)", spec.id, error)
    return on_device(pipeline, placement, spec)
