"""The host-memory keeper's bookkeeping (deployments/workers/host_memory.py) without Ray:
what it holds, how much, and what it drops to make room. (The path through Ray's object
store, and that a pipeline taken from it makes the same images, is in
tests/integration/test_host_memory.py.)"""

from __future__ import annotations

from deployments.workers.host_memory import HostMemory, host_key
from models.catalog import load_catalog
from models.device import Placement


def keeper(capacity_bytes: int) -> HostMemory:
    return HostMemory(capacity_bytes, store=lambda pipeline: f"stored {pipeline}")


def test_a_kept_pipeline_is_found_and_counted_when_taken() -> None:
    memory = keeper(100)
    assert memory.find("a") == []
    assert memory.keep("a", "pipeline-a", 40) == []
    assert memory.find("a") == ["stored pipeline-a"]
    assert memory.find("a") == ["stored pipeline-a"]
    assert memory.held() == {"a": {"bytes": 40, "taken": 2}}


def test_room_is_made_by_dropping_the_least_recently_used() -> None:
    memory = keeper(100)
    memory.keep("a", "pa", 40)
    memory.keep("b", "pb", 40)
    memory.find("a")  # a is now the most recently used
    assert memory.keep("c", "pc", 40) == ["b"]
    assert set(memory.held()) == {"a", "c"} and memory.held_bytes() == 80
    assert memory.keep("a", "pa2", 40) == []  # kept again: replaced, not counted twice
    assert memory.find("a") == ["stored pa2"] and memory.held_bytes() == 80


def test_a_model_larger_than_the_keeper_is_not_kept() -> None:
    memory = keeper(100)
    assert memory.room_for(100) and not memory.room_for(101)
    assert memory.forget("missing") is False
    memory.keep("a", "pa", 10)
    assert memory.forget("a") is True and memory.held() == {}


def test_the_key_names_the_version_source_and_dtype() -> None:
    spec = load_catalog().models["tiny-sd"]
    cpu, gpu = Placement("cpu", "float32"), Placement("cuda", "bfloat16")
    assert host_key(spec, cpu) != host_key(spec, gpu)
    assert host_key(spec, cpu) != host_key(spec.model_copy(update={"version": "2"}), cpu)
    assert host_key(spec, cpu) != host_key(spec.model_copy(update={"source": "tiny://x"}), cpu)
