"""Which free node gets the next job: the fastest one with a free slot.

A node's speed is its start-up benchmark score, corrected by how fast it actually runs jobs
compared with the other nodes (:class:`SpeedModel`). Nodes of equal speed take turns
(round-robin), so with identical nodes this is the plain round-robin it replaces.
"""

from __future__ import annotations

import heapq
import itertools

__all__ = ["FreeNodes", "SpeedModel"]


class FreeNodes:
    """Nodes with a free slot, best (highest speed) first; ties in arrival order.

    A binary heap with lazy deletion: ``discard`` and speed changes leave stale entries that
    ``pop`` skips, so every operation is O(log n) whatever the number of nodes.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._speed: dict[str, float] = {}  # members and the speed of their live heap entry
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._speed)

    def __bool__(self) -> bool:
        return bool(self._speed)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._speed

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._speed))

    def add(self, node_id: str, speed: float) -> None:
        """Insert ``node_id``, or move it to the back of its speed class with a new speed."""
        if self._speed.get(node_id) == speed:
            return
        self._speed[node_id] = speed
        heapq.heappush(self._heap, (-speed, next(self._seq), node_id))
        if len(self._heap) > 2 * len(self._speed) + 64:
            self._compact()

    def discard(self, node_id: str) -> None:
        self._speed.pop(node_id, None)

    def pop(self) -> str:
        """Remove and return the fastest free node. Raises IndexError if none."""
        while self._heap:
            neg_speed, _, node_id = heapq.heappop(self._heap)
            if self._speed.get(node_id) == -neg_speed:
                del self._speed[node_id]
                return node_id
        raise IndexError("no free node")

    def _compact(self) -> None:
        live = {(-s, n) for n, s in self._speed.items()}
        self._heap = [e for e in self._heap if (e[0], e[2]) in live]
        heapq.heapify(self._heap)


class SpeedModel:
    """Learns each node's speed from the durations of the jobs it runs.

    ``speed = score * (typical duration on all nodes / typical duration on this node)``, with
    exponentially weighted averages, so a node that is slower than its benchmark promised (or
    slowed down later) is preferred less, and the preference follows changes.
    """

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self._overall: float | None = None
        self._per_node: dict[str, float] = {}
        self._score: dict[str, float] = {}

    def add_node(self, node_id: str, score: float) -> None:
        self._score[node_id] = score if score > 0 else 1.0

    def remove_node(self, node_id: str) -> None:
        self._score.pop(node_id, None)
        self._per_node.pop(node_id, None)

    def observe(self, node_id: str, duration: float) -> float | None:
        """Learn from one job's ``duration`` on the node; return the node's typical duration
        now (:meth:`observed`), or None if the observation was ignored (an unknown node, or
        a duration that is not positive)."""
        if duration <= 0 or node_id not in self._score:
            return None
        a = self.alpha
        self._overall = duration if self._overall is None else (1 - a) * self._overall + a * duration
        old = self._per_node.get(node_id)
        typical = self._per_node[node_id] = duration if old is None else (1 - a) * old + a * duration
        return typical

    def speed(self, node_id: str) -> float:
        score = self._score.get(node_id, 1.0)
        mine = self._per_node.get(node_id)
        if mine is None or self._overall is None:
            return score
        return score * self._overall / mine

    def observed(self, node_id: str) -> float | None:
        """The node's typical job duration, if it ran any."""
        return self._per_node.get(node_id)
