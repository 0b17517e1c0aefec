"""Runs a function in a few CPU processes joined by torch.distributed (gloo), for tests.

One call of :func:`spawn` starts ``world_size`` fresh interpreters (``spawn`` start method, so
nothing of the parent's threads or state is inherited), joins them in one process group through
a file rendezvous (no port to pick), calls ``fn(rank, world_size, *args)`` in each and returns
their results, rank by rank. Starting the processes costs seconds (each imports torch), so a test
module should make ONE call that runs all its scenarios, from a module-scoped fixture, and let
separate test functions assert on the returned results::

    # tests/distributed/test_x.py
    from _spawn import spawn

    def _scenarios(rank, world_size):          # module level: the children import it by name
        ...
        return {"out": out}                    # anything torch.save can write

    @pytest.fixture(scope="module")
    def results():
        return spawn(_scenarios, 2)

A child that raises makes :func:`spawn` raise ``RuntimeError`` with the child's traceback; a run
that does not finish within ``timeout_s`` is killed and raises ``TimeoutError`` (so a collective
that hangs fails the test instead of hanging it).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["requires_gloo", "spawn"]

#: Marks a test that needs torch.distributed with the gloo backend.
requires_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def _entry(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...],
    backend: str,
    rendezvous: str,
    out_dir: str,
    collective_timeout_s: float,
    threads: int,
) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(
        backend,
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=collective_timeout_s),
    )
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        result = fn(rank, world_size, *args)
    except BaseException:
        torch.save({"error": traceback.format_exc()}, path)
        raise
    else:
        torch.save({"result": result}, path)
    finally:
        # a group whose peer failed cannot always be torn down cleanly; the process exits anyway
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any],
    world_size: int = 2,
    *,
    args: tuple[Any, ...] = (),
    backend: str = "gloo",
    timeout_s: float = 120.0,
    collective_timeout_s: float = 60.0,
    threads: int = 1,
) -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` processes; returns their results.

    Args:
        fn: a module-level function (the children import it by its module and name).
        world_size: the number of processes. Default: 2.
        args: further arguments for ``fn`` (picklable).
        backend: the process-group backend. Default: ``"gloo"`` (CPU).
        timeout_s: wall-clock limit of the whole run, start-up included. Default: 120.
        collective_timeout_s: the process group's timeout (a collective waiting longer than
            this raises in the child). Default: 60.
        threads: ``torch.set_num_threads`` in each child. Default: 1.

    Returns:
        ``[result of rank 0, result of rank 1, ...]``.

    Raises:
        RuntimeError: a child raised (the message holds its traceback) or died.
        TimeoutError: the run took longer than ``timeout_s`` (the children are killed).
    """
    with tempfile.TemporaryDirectory(prefix="metanorm-spawn-") as tmp:
        rendezvous = os.path.join(tmp, "rendezvous")
        context = mp.start_processes(
            _entry,
            args=(
                fn,
                world_size,
                tuple(args),
                backend,
                rendezvous,
                tmp,
                collective_timeout_s,
                threads,
            ),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        failure: BaseException | None = None
        try:
            while not context.join(timeout=0.2):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the {world_size} spawned processes did not finish within {timeout_s} s"
                    )
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            failure = exc
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        results: list[Any] = []
        errors: list[str] = []
        for rank in range(world_size):
            path = os.path.join(tmp, f"rank{rank}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {rank}: no result")
                results.append(None)
                continue
            saved = torch.load(path, weights_only=False)
            if "error" in saved:
                errors.append(f"rank {rank}:\n{saved['error']}")
                results.append(None)
            else:
                results.append(saved["result"])
        if failure is not None or errors:
            raise RuntimeError("a spawned process failed:\n" + "\n".join(errors or [str(failure)]))
        return results
