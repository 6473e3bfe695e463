"""The host-memory keeper's bookkeeping (deployments/workers/host_memory.py) without Ray:
what it holds, how much, what it drops to make room, who loads a missing model; and a
replica's fall back to files when the keeper fails. (The path through Ray's object
store, and that a pipeline taken from it makes the same images, is in
tests/integration/test_host_memory.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deployments.workers import host_memory
from deployments.workers.host_memory import CLAIM_S, HostMemory, Kept, host_key
from models.catalog import load_catalog
from models.device import Placement
from tests.fakes import FakeClock

SD = load_catalog().models["tiny-sd"]


def keeper(capacity_bytes: int, clock: FakeClock | None = None) -> HostMemory:
    def store(pipeline: Any) -> str:
        if pipeline == "unstorable":
            raise MemoryError("object store full")
        return f"stored {pipeline}"

    return HostMemory(capacity_bytes, store=store, clock=clock or FakeClock())


def test_the_first_miss_claims_the_key_and_later_ones_load_without_keeping() -> None:
    clock = FakeClock()
    memory = keeper(100, clock)
    assert memory.find_or_claim("a") == ([], True)
    assert memory.find_or_claim("a") == ([], False)  # another replica is loading it
    clock.advance(CLAIM_S)
    assert memory.find_or_claim("a") == ([], True)  # that one never handed it over
    assert memory.keep("a", "pipeline-a", 40) == []
    assert memory.find_or_claim("a") == (["stored pipeline-a"], False)
    assert memory.find_or_claim("a") == (["stored pipeline-a"], False)
    assert memory.held() == [Kept(key="a", size_bytes=40, taken=2)]


def test_room_is_made_by_dropping_the_least_recently_used() -> None:
    memory = keeper(100)
    memory.keep("a", "pa", 40)
    memory.keep("b", "pb", 40)
    memory.find_or_claim("a")  # a is now the most recently used
    assert memory.keep("c", "pc", 40) == ["b"]
    assert [kept.key for kept in memory.held()] == ["a", "c"] and memory.held_bytes() == 80
    assert memory.keep("a", "pa2", 40) == []  # kept again: replaced, not counted twice
    assert memory.find_or_claim("a")[0] == ["stored pa2"] and memory.held_bytes() == 80


def test_a_model_larger_than_the_keeper_or_a_failed_store_drops_nothing() -> None:
    memory = keeper(100)
    memory.keep("a", "pa", 60)
    assert memory.find_or_claim("huge") == ([], True)
    assert memory.keep("huge", "ph", 101) == []
    assert memory.find_or_claim("huge") == ([], False)  # not handed over again
    with pytest.raises(MemoryError):
        memory.keep("b", "unstorable", 60)
    assert [kept.key for kept in memory.held()] == ["a"]
    assert memory.forget("missing") is False
    assert memory.forget("a") is True and memory.held() == []


def test_the_key_names_the_version_source_class_and_dtype() -> None:
    cpu, gpu = Placement("cpu", "float32"), Placement("cuda", "bfloat16")
    assert host_key(SD, cpu) != host_key(SD, gpu)
    for change in ({"version": "2"}, {"source": "tiny://x"}, {"pipeline_class": "X"}):
        assert host_key(SD, cpu) != host_key(SD.model_copy(update=change), cpu)


def test_a_keeper_that_fails_means_files(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_keeper() -> Any:
        raise RuntimeError("the keeper's node is gone")

    read: list[str] = []

    def from_files(spec: Any, **_: Any) -> str:
        read.append(spec.id)
        return "from files"

    monkeypatch.setattr(host_memory, "node_keeper", no_keeper)
    monkeypatch.setattr(host_memory, "read_pipeline", from_files)
    monkeypatch.setattr(host_memory, "on_device", lambda pipeline, placement, spec: pipeline)
    spec = SD.model_copy(update={"host_memory": True})
    assert host_memory.load_through_host_memory(spec, cache_dir=Path("/nowhere")) == "from files"
    assert read == ["tiny-sd"]


def test_a_simulated_model_loads_as_always() -> None:
    spec = (
        load_catalog()
        .models["tiny-sd"]
        .model_copy(update={"source": "simulated://sim?step_ms=1", "host_memory": True})
    )
    pipeline = host_memory.load_through_host_memory(spec, cache_dir=Path("/nowhere"))
    assert type(pipeline).__name__ == "SimulatedPipeline"
