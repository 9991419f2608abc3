"""Run a function on N ranks in separate processes, with a timeout, reusing the processes.

    results = run_distributed(check_something, world_size=2, *args)

`check_something` must be a module-level function (it is pickled by name). Each rank runs it after
`reference.init_distributed` and returns its value; `run_distributed` returns the values in rank
order. A rank that raises fails the call with that rank's traceback; ranks that do not answer within
`timeout` fail it with a TimeoutError naming them. After any failure the pool is torn down (a rank
may be stuck in a collective), and the next call starts a fresh one.

Starting a process and importing torch costs about a second per rank on a small machine, far more
than a typical check, so each world size keeps one pool of live workers for the whole test session.

The backend is gloo on CPU unless TP_LORA_TEST_BACKEND=nccl (one GPU per rank).
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback

import torch

import reference

BACKEND = os.environ.get("TP_LORA_TEST_BACKEND", "gloo")
COLLECTIVE_TIMEOUT_S = 60.0
DEFAULT_TIMEOUT_S = 120.0


class RankFailed(AssertionError):
    pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_main(rank: int, world_size: int, port: int, backend: str, tasks, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # N ranks share a few cores: one thread each avoids oversubscription
    try:
        reference.init_distributed(backend=backend, timeout_s=COLLECTIVE_TIMEOUT_S)
        results.put(("ready", rank, True, None))
    except BaseException:
        results.put(("ready", rank, False, traceback.format_exc()))
        return
    while True:
        job = tasks.get()
        if job is None:
            break
        job_id, fn, args, kwargs = job
        try:
            value = fn(*args, **kwargs)
            results.put((job_id, rank, True, value))
        except BaseException:
            results.put((job_id, rank, False, traceback.format_exc()))
        finally:
            reference.destroy_model_parallel()
    torch.distributed.destroy_process_group()


class WorkerPool:
    """`world_size` live worker processes joined in one process group."""

    def __init__(self, world_size: int, backend: str = BACKEND, start_timeout: float = 120.0):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        port = _free_port()
        self.procs = [
            ctx.Process(target=_worker_main, args=(r, world_size, port, backend, self.tasks[r], self.results),
                        daemon=True, name=f"rank{r}")
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()
        self._next_job = 0
        replies = self._collect("ready", start_timeout)
        failed = {r: tb for r, (ok, tb) in replies.items() if not ok}
        if failed or len(replies) < world_size:
            message = self._describe("starting the process group", failed, replies, start_timeout)
            self.kill()
            raise RankFailed(message)

    def _collect(self, job_id, timeout: float) -> dict[int, tuple[bool, object]]:
        """Replies for `job_id` by rank, until all ranks answered, one failed (plus a grace), or timeout."""
        replies: dict[int, tuple[bool, object]] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < self.world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                got_id, rank, ok, value = self.results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if any(not p.is_alive() for p in self.procs):
                    # A rank died without answering; give the others a moment, then stop waiting.
                    deadline = min(deadline, time.monotonic() + 2.0)
                continue
            if got_id != job_id:
                continue  # a late answer to an earlier job that already failed
            replies[rank] = (ok, value)
            if not ok:
                # The others may be blocked in a collective waiting for this rank: wait briefly.
                deadline = min(deadline, time.monotonic() + 5.0)
        return replies

    def _describe(self, what, failed, replies, timeout) -> str:
        lines = []
        for rank in sorted(failed):
            lines.append(f"rank {rank} raised while {what}:\n{failed[rank]}")
        silent = [r for r in range(self.world_size) if r not in replies]
        dead = [r for r in silent if not self.procs[r].is_alive()]
        if dead:
            lines.append(f"rank(s) {dead} died (exit codes {[self.procs[r].exitcode for r in dead]})")
        stuck = [r for r in silent if r not in dead]
        if stuck:
            lines.append(f"rank(s) {stuck} gave no answer within {timeout:.0f} s while {what} "
                         f"(hung, or blocked in a collective)")
        return "\n".join(lines)

    def run(self, fn, *args, timeout: float = DEFAULT_TIMEOUT_S, **kwargs) -> list:
        job_id = self._next_job
        self._next_job += 1
        for q in self.tasks:
            q.put((job_id, fn, args, kwargs))
        replies = self._collect(job_id, timeout)
        failed = {r: v for r, (ok, v) in replies.items() if not ok}
        if failed or len(replies) < self.world_size:
            name = getattr(fn, "__qualname__", repr(fn))
            message = self._describe(f"running {name}", failed, replies, timeout)
            self.kill()
            raise RankFailed(message)
        return [replies[r][1] for r in range(self.world_size)]

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
        self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=10)


_POOLS: dict[int, WorkerPool] = {}


def get_pool(world_size: int) -> WorkerPool:
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive():
        pool = _POOLS[world_size] = WorkerPool(world_size)
    return pool


def run_distributed(fn, world_size: int, *args, timeout: float = DEFAULT_TIMEOUT_S, **kwargs) -> list:
    """Run fn(*args, **kwargs) on `world_size` ranks; return the per-rank results in rank order."""
    pool = get_pool(world_size)
    try:
        return pool.run(fn, *args, timeout=timeout, **kwargs)
    finally:
        if not pool.alive():
            _POOLS.pop(world_size, None)


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
