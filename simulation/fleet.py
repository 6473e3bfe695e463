"""The simulated GPU fleet: nodes that boot, replicas placed on them that load their
model, and what Ray does between Serve's decision and a replica serving.

Serve's controller (``simulation.control``) sets each worker's target replica count;
this module is Ray's side of it, as Ray documents it: a replica that finds no free GPU
waits as a pending actor; the cluster autoscaler launches nodes for pending demand
every few seconds, at most ``max(5, upscaling_speed x nodes)`` pending at once and
never past a type's ``max_nodes``; a node that has held no replica for its
``idle_timeout_s`` is released. When a worker shrinks, Serve stops the replicas that
cost least to lose: pending first, then starting, then idle, then busy ones, which
finish their work before they go (a graceful stop).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from simulation.scenario import ModelProfile, NodeType

ReplicaState = Literal["new", "pending", "starting", "running", "stopping", "gone"]
RAY_MIN_PENDING_NODES = 5  # Ray's autoscaler always allows this many nodes pending


@dataclass(eq=False)
class Node:
    node_id: int
    type_name: str
    gpus: int
    launched_at: float
    up_at: float | None = None  # None: still booting
    free_gpus: int = 0
    replicas: set[Replica] = field(default_factory=set)
    idle_since: float | None = None
    ended_at: float | None = None


@dataclass(eq=False)
class Replica:
    replica_id: int
    model: str
    gpus: int
    state: ReplicaState = "new"
    node: Node | None = None
    ready_at: float | None = None
    batches: set[int] = field(default_factory=set)  # batch ids running on it


class Fleet:
    """Nodes and replicas, indexed so that a pass costs what changed, not the fleet's
    size; ``schedule(at, event, payload)`` is the simulator's calendar."""

    def __init__(
        self,
        node_types: dict[str, NodeType],
        models: dict[str, ModelProfile],
        *,
        upscaling_speed: float,
        schedule: Callable[[float, str, object], None],
        on_removed: Callable[[Replica, ReplicaState], None] = lambda replica, was: None,
    ) -> None:
        self.node_types = node_types
        self._on_removed = on_removed  # told of each replica stopped, and its state before
        self.models = models
        self.upscaling_speed = upscaling_speed
        self._schedule = schedule
        self.max_nodes = {name: spec.max_nodes for name, spec in node_types.items()}
        self.nodes: dict[int, Node] = {}
        self.ended_nodes: list[Node] = []
        self._ids = itertools.count()
        self.nodes_launched = 0
        # Indexes: nodes per type, booting ones, up ones with room, empty ones.
        self._by_type: dict[str, dict[int, Node]] = {name: {} for name in node_types}
        self._booting: dict[str, dict[int, Node]] = {name: {} for name in node_types}
        self._with_room: dict[str, dict[int, Node]] = {name: {} for name in node_types}
        self._empty: dict[str, dict[int, Node]] = {name: {} for name in node_types}
        # Replicas per model and state (dicts keep their start order).
        self.pending: dict[str, dict[int, Replica]] = {name: {} for name in models}
        self.starting: dict[str, dict[int, Replica]] = {name: {} for name in models}
        self.running: dict[str, dict[int, Replica]] = {name: {} for name in models}
        self.stopping: dict[str, dict[int, Replica]] = {name: {} for name in models}

    def _states(self, model: str) -> dict[ReplicaState, dict[int, Replica]]:
        return {
            "pending": self.pending[model],
            "starting": self.starting[model],
            "running": self.running[model],
            "stopping": self.stopping[model],
        }

    def _move(self, replica: Replica, state: ReplicaState) -> None:
        states = self._states(replica.model)
        if replica.state in states:
            del states[replica.state][replica.replica_id]
        replica.state = state
        if state in states:
            states[state][replica.replica_id] = replica

    # Serve's side: how many replicas each worker should have.
    def live_count(self, model: str) -> int:
        """Replicas that count toward the target (all but stopping ones)."""
        return len(self.pending[model]) + len(self.starting[model]) + len(self.running[model])

    def set_target(self, model: str, target: int, now: float) -> list[Replica]:
        """Start or stop replicas to reach ``target``; returns those told to stop while
        busy (they finish their batches first)."""
        live = self.live_count(model)
        if target == live:
            return []
        profile = self.models[model]
        for _ in range(target - live):
            self._move(Replica(next(self._ids), model, profile.gpus_per_replica), "pending")
        draining: list[Replica] = []
        excess = live - target
        for states in (self.pending[model], self.starting[model]):
            for replica in list(reversed(states.values()))[: max(0, excess)]:
                self.remove_replica(replica, now)
                excess -= 1
        if excess > 0:
            running = sorted(
                self.running[model].values(), key=lambda r: (len(r.batches), -r.replica_id)
            )
            for replica in running[:excess]:
                if replica.batches:
                    self._move(replica, "stopping")
                    draining.append(replica)
                else:
                    self.remove_replica(replica, now)
        self.place_pending(now)
        return draining

    def warm_start(self, now: float) -> list[Replica]:
        """Nodes already up for the replicas pending now, and those replicas loaded: a
        run starts from a fleet that has been serving, not from an empty cloud account.
        Returns the replicas now running."""
        for type_name, spec in self.node_types.items():
            gpus = self._pending_gpus(type_name)
            for _ in range(max(math.ceil(gpus / spec.gpus), spec.min_nodes)):
                self._launch(type_name, spec, now, booted=True)
                node = next(reversed(self._booting[type_name].values()))
                self.node_up(node, now)
        started = [r for states in self.starting.values() for r in states.values()]
        for replica in started:
            self._move(replica, "running")
        return started

    def remove_replica(self, replica: Replica, now: float) -> None:
        was = replica.state
        self._move(replica, "gone")
        self._on_removed(replica, was)
        node = replica.node
        if node is not None and replica in node.replicas:
            node.replicas.discard(replica)
            node.free_gpus += replica.gpus
            self._with_room[node.type_name][node.node_id] = node
            if not node.replicas:
                node.idle_since = now
                self._empty[node.type_name][node.node_id] = node

    # Ray's side: placing replicas, launching and releasing nodes.
    def place_pending(self, now: float) -> None:
        for model, pending in self.pending.items():
            profile = self.models[model]
            for replica in list(pending.values()):
                node = self._node_with_room(profile.node_type, replica.gpus)
                if node is None:
                    break  # later replicas of this model wait too: FIFO
                node.free_gpus -= replica.gpus
                if not node.free_gpus:
                    del self._with_room[node.type_name][node.node_id]
                node.replicas.add(replica)
                node.idle_since = None
                self._empty[node.type_name].pop(node.node_id, None)
                replica.node = node
                self._move(replica, "starting")
                replica.ready_at = now + profile.load_s
                self._schedule(replica.ready_at, "replica_ready", replica)

    def _node_with_room(self, type_name: str, gpus: int) -> Node | None:
        best: Node | None = None
        for node in self._with_room[type_name].values():  # the fullest with room: packs
            if node.free_gpus >= gpus and (best is None or node.free_gpus < best.free_gpus):
                best = node
                if best.free_gpus == gpus:
                    break
        return best

    def replica_ready(self, replica: Replica) -> bool:
        """A started replica finished loading; False if it was stopped meanwhile."""
        if replica.state != "starting":
            return False
        self._move(replica, "running")
        return True

    def autoscale_nodes(self, now: float) -> None:
        """One pass of Ray's cluster autoscaler: launch for pending demand, release idle."""
        for type_name, spec in self.node_types.items():
            pending_gpus = self._pending_gpus(type_name)
            nodes, booting = len(self._by_type[type_name]), len(self._booting[type_name])
            shortfall = pending_gpus - booting * spec.gpus
            wanted = max(math.ceil(shortfall / spec.gpus), spec.min_nodes - nodes, 0)
            up = nodes - booting
            room_pending = max(RAY_MIN_PENDING_NODES, int(self.upscaling_speed * up)) - booting
            room_cap = self.max_nodes[type_name] - nodes
            for _ in range(max(0, min(wanted, room_pending, room_cap))):
                self._launch(type_name, spec, now)
            for node in list(self._empty[type_name].values()):
                idle_s = now - (node.idle_since if node.idle_since is not None else now)
                if idle_s >= spec.idle_timeout_s and len(self._by_type[type_name]) > spec.min_nodes:
                    self.end_node(node, now)

    def _pending_gpus(self, type_name: str) -> int:
        """GPUs asked for by the replicas waiting for a node of ``type_name``."""
        return sum(
            replica.gpus
            for model, pending in self.pending.items()
            if self.models[model].node_type == type_name
            for replica in pending.values()
        )

    def _launch(self, type_name: str, spec: NodeType, now: float, *, booted: bool = False) -> None:
        node = Node(next(self._ids), type_name, spec.gpus, launched_at=now)
        self.nodes[node.node_id] = node
        self._by_type[type_name][node.node_id] = node
        self._booting[type_name][node.node_id] = node
        self.nodes_launched += 1
        if not booted:  # (a booted one's caller brings it up at once)
            self._schedule(now + spec.boot_s, "node_up", node)

    def node_up(self, node: Node, now: float) -> None:
        if node.ended_at is not None:
            return  # lost while booting
        del self._booting[node.type_name][node.node_id]
        node.up_at, node.free_gpus, node.idle_since = now, node.gpus, now
        self._with_room[node.type_name][node.node_id] = node
        self._empty[node.type_name][node.node_id] = node
        self.place_pending(now)

    def end_node(self, node: Node, now: float) -> list[tuple[Replica, ReplicaState]]:
        """Release (or lose) a node; returns the replicas that were on it, and their
        states then."""
        node.ended_at = now
        del self.nodes[node.node_id]
        for index in (self._by_type, self._booting, self._with_room, self._empty):
            index[node.type_name].pop(node.node_id, None)
        self.ended_nodes.append(node)
        lost = [(replica, replica.state) for replica in node.replicas]
        for replica, _ in lost:
            replica.node = None
            self._move(replica, "gone")
        node.replicas.clear()
        return lost

    def nodes_of(self, type_name: str) -> list[Node]:
        return list(self._by_type[type_name].values())

    def node_count(self, type_name: str) -> int:
        return len(self._by_type[type_name])

    # What the report samples.
    def gpus(self, *, up_only: bool = False) -> int:
        if not up_only:
            return sum(n.gpus for n in self.nodes.values())
        return sum(n.gpus for n in self.nodes.values() if n.up_at is not None)

    def node_cost(self, until: float) -> tuple[float, float]:
        """(GPU-hours, cost) of every node launched so far, up to ``until``."""
        gpu_hours = cost = 0.0
        for node in itertools.chain(self.nodes.values(), self.ended_nodes):
            end = node.ended_at if node.ended_at is not None else until
            hours = (end - node.launched_at) / 3600
            gpu_hours += hours * node.gpus
            cost += hours * self.node_types[node.type_name].cost_per_hour
        return gpu_hours, cost
