"""How much of the test suite's time is process start-up: time a worker pool's start and a no-op job.

    python -m tests.harness_cost
"""

import time

from tests.distributed import WorkerPool
from tests.test_harness import ranks

if __name__ == "__main__":
    for world in (1, 2, 4):
        start = time.perf_counter()
        pool = WorkerPool(world)
        started = time.perf_counter()
        for _ in range(20):
            pool.run(ranks)
        done = time.perf_counter()
        pool.close()
        print(f"world {world}: pool start {started - start:.2f} s, no-op job {(done - started) / 20 * 1e3:.1f} ms")
