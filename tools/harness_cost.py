"""How much of the test suite's time is process start-up: time a worker pool's start and a no-op job.

    python tools/harness_cost.py
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.distributed import WorkerPool  # noqa: E402
from tests.test_harness import ranks  # noqa: E402

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
