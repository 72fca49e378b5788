"""Run a function in several processes joined by a gloo process group, as torchrun would."""
from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from multiprocessing import connection
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout: float = 600) -> list[Any]:
    """fn(rank, *args) in `world_size` fresh processes with torchrun's environment variables set
    (zerokit.initialize creates the gloo group from them); returns each rank's result."""
    port = free_port()
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        processes = [
            context.Process(target=_worker, args=(fn, rank, world_size, port, folder, args)) for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        stopped_early = _wait_for_all_or_a_failure(processes, timeout)
        failures = []
        for rank, process in enumerate(processes):
            if process.is_alive():
                process.kill()
                process.join()
                failures.append(f"rank {rank} stopped: another rank failed" if stopped_early
                                else f"rank {rank} timed out after {timeout}s")  # fmt: skip
            elif process.exitcode != 0:
                error_file = os.path.join(folder, f"{rank}.err")
                detail = open(error_file).read() if os.path.exists(error_file) else f"exit code {process.exitcode}"
                failures.append(f"rank {rank} failed:\n{detail}")
        if failures:
            raise AssertionError("\n".join(failures))
        return [torch.load(os.path.join(folder, f"{rank}.pt"), weights_only=False) for rank in range(world_size)]


def _wait_for_all_or_a_failure(processes: list, timeout: float) -> bool:
    """Wait until every process has exited, one has failed (True: the others would wait for it in a
    collective until their own timeout), or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    running = list(processes)
    while running and time.monotonic() < deadline:
        connection.wait([p.sentinel for p in running], deadline - time.monotonic())
        running = [p for p in running if p.exitcode is None]
        if running and any(p.exitcode not in (None, 0) for p in processes):
            return True
    return False


def _worker(fn, rank, world_size, port, folder, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        result = fn(rank, *args)
        torch.save(result, os.path.join(folder, f"{rank}.pt"))
    except BaseException:
        with open(os.path.join(folder, f"{rank}.err"), "w") as handle:
            handle.write(traceback.format_exc())
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
