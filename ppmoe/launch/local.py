"""Run a function on N local processes joined like torchrun's (RANK, WORLD_SIZE, MASTER_* set), forked
after `import torch`: ~100x cheaper than a torchrun launch on a small machine. Used by the tests (every
parallel layout against one process) and the benchmarks. CPU/gloo; one intra-op thread per rank."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_module
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                      OMP_NUM_THREADS="1")
    try:
        import torch

        torch.set_num_threads(1)
        import torch.distributed as dist

        result = fn(*args)
        if dist.is_initialized():
            dist.destroy_process_group()
        # Plain pickle copies tensor data into bytes; the queue's own pickler would share memory that
        # dies with this process before the parent reads it.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # report every failure to the parent, including SystemExit
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """fn(*args) on `world_size` processes (RANK/WORLD_SIZE/MASTER_* set as torchrun would);
    returns the per-rank results in rank order, or raises with the failing rank's traceback."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in procs:
            try:
                rank, status, payload = queue.get(timeout=timeout)
            except queue_module.Empty:
                missing = sorted(set(range(world_size)) - set(results))
                errors.append(f"ranks {missing} did not finish within {timeout:.0f} s (hung in a collective?)")
                break
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]


def _killed_child(fn, rank, world_size, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    fn(*args)


def run_ranks_expecting_death(fn, world_size: int, *args, timeout: float = 300.0) -> list[int | None]:
    """fn(*args) on `world_size` forked ranks that are meant to die (a test's SIGKILL at a chosen moment);
    returns their exit codes (-9 for SIGKILL) instead of results."""
    ctx = mp.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_killed_child, args=(fn, r, world_size, port, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
        if p.is_alive():
            p.kill()
    return [p.exitcode for p in procs]
