"""clusterpy from asyncio: await jobs, iterate them as they complete, gather, cancel.

    python examples/async_api.py                  # embedded local node
    python examples/async_api.py 10.0.0.5         # real nodes
"""

import asyncio
import sys

import clusterpy


def compute(n, delay=0.0):
    import time

    time.sleep(delay)
    return n * n


async def main(nodes):
    options = {"nodes": nodes} if nodes else {"local": True, "local_cpus": 2}
    async with clusterpy.JobCluster(compute, **options) as cluster:
        job = await cluster.submit_async(12)
        print("awaited:", await job)

        jobs = [cluster.submit(n, delay=0.3 - n / 20) for n in range(5)]
        async for done in cluster.as_completed(jobs):
            print(f"job {done.id} done: {done.result}")
        print("gathered:", await cluster.gather(jobs))

        # Cancelling the task that awaits a job cancels the job on its node (it is terminated).
        slow = cluster.submit(0, delay=60)
        task = asyncio.ensure_future(asyncio.wait_for(slow, timeout=0.5))
        try:
            await task
        except asyncio.TimeoutError:
            pass
        try:
            await asyncio.wrap_future(slow.future)
        except clusterpy.JobCancelledError:
            print("cancelled on the node:", slow.status.value)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
