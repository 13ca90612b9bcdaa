"""`collector/worker_pool.py`: calls run in spawned workers, a dead worker fails only its call and is replaced,
and a parent killed outright leaves no worker behind."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.support.reliability import descendants, survivors
from tracetape.collector.worker_pool import WorkerDied, WorkerPool


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_dead_worker_fails_its_call_and_the_pool_starts_new_ones() -> None:
    async def scenario() -> None:
        pool = WorkerPool(1, name="test worker")
        try:
            first = await pool.run(os.getpid)
            assert first != os.getpid()
            with pytest.raises(WorkerDied):
                await pool.run(_die)
            assert pool.restarts == 1
            second = await pool.run(os.getpid)
            assert second not in (first, os.getpid())
            assert await pool.run(sum, [1, 2, 3]) == 6
        finally:
            await asyncio.get_running_loop().run_in_executor(None, pool.shutdown)

    asyncio.run(scenario())


PARENT = """
import asyncio, time
from tracetape.collector.worker_pool import WorkerPool

async def main():
    await WorkerPool(2).start()
    print("started", flush=True)
    time.sleep(60)

asyncio.run(main())
"""


def test_workers_exit_when_their_parent_is_killed() -> None:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(PARENT)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "started\n"
        children = descendants(proc.pid)  # the two workers and multiprocessing's resource tracker
        assert len(children) >= 2
    finally:
        proc.kill()
        proc.wait()
    assert survivors(children) == {}
