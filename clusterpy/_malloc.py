"""glibc malloc tuning for clusterpy's own processes (workers and daemons), never for a user's."""

from __future__ import annotations

__all__ = ["tune_malloc"]

MiB = 1 << 20


def tune_malloc(mmap_threshold: int = 4 * MiB, trim_threshold: int = 16 * MiB) -> None:
    """Serve allocations of up to ``mmap_threshold`` from the heap, and keep up to
    ``trim_threshold`` of it once freed.

    By default glibc gives each large buffer a fresh mmap, paid in page faults on every
    message: about 40% of a worker's CPU for jobs that take and return 1 MB, and most of a
    node's system time for 16 MB payloads. The price is memory kept after a burst: up to
    ``trim_threshold`` per process. Workers (one per CPU) use the defaults; a node (one
    process, every payload passes through it) keeps more. glibc caps ``mmap_threshold`` at
    32 MiB. Best effort: a no-op where there is no glibc ``mallopt``.
    """
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt(m_mmap_threshold, mmap_threshold)
    mallopt(m_trim_threshold, trim_threshold)
