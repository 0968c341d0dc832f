"""The queue of jobs waiting for any node: one FIFO per owner, served round-robin."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

__all__ = ["FairQueue"]


class FairQueue:
    """Jobs waiting for any node, one FIFO per owner, served round-robin across owners.

    With one owner this is a plain FIFO. With several (clients of a shared scheduler), each
    free slot goes to the next owner in turn, so a client with 10 jobs is not starved behind
    one with 10,000: every owner gets an equal share of dispatches while it has work.
    """

    def __init__(self) -> None:
        self._by_owner: dict[str, deque[str]] = {}
        self._turns: deque[str] = deque()  # owners with queued jobs, next to serve first
        #: Jobs queued (read-only for callers): what ``len()`` returns, without a method call
        #: in the scheduler's per-job paths.
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return self.size > 0

    def __iter__(self) -> Iterator[str]:
        for owner in self._turns:
            yield from self._by_owner[owner]

    def _queue_of(self, owner: str) -> deque[str]:
        queue = self._by_owner.get(owner)
        if queue is None:
            queue = self._by_owner[owner] = deque()
        if not queue:
            self._turns.append(owner)
        return queue

    def append(self, job_id: str, owner: str) -> None:
        queue = self._by_owner.get(owner)
        if queue:  # the owner has jobs waiting (and its turn): once per job, no call
            queue.append(job_id)
        else:
            self._queue_of(owner).append(job_id)
        self.size += 1

    def appendleft(self, job_id: str, owner: str) -> None:
        """Put a job back at the head of its owner's queue (it was moved off a lost node)."""
        self._queue_of(owner).appendleft(job_id)
        self.size += 1

    def popleft(self) -> str:
        owner = self._turns.popleft()
        queue = self._by_owner[owner]
        job_id = queue.popleft()
        self.size -= 1
        if queue:
            self._turns.append(owner)
        else:
            del self._by_owner[owner]
        return job_id

    def remove(self, job_id: str, owner: str) -> None:
        queue = self._by_owner[owner]
        queue.remove(job_id)
        self.size -= 1
        if not queue:
            del self._by_owner[owner]
            self._turns.remove(owner)

    def owners(self) -> int:
        return len(self._turns)
