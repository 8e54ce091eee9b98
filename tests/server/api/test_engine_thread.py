"""EngineThread: the server's one torch thread runs what it is given, in order, on one thread,
and hands back results and exceptions; torch work there gets one OpenMP team (see engine_loop)."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from loraplex.server.api.engine_loop import EngineThread


def test_jobs_run_in_order_on_one_daemon_thread_and_hand_back_results():
    async def main():
        thread = EngineThread()
        seen: list[tuple[int, int]] = []

        def job(i: int) -> int:
            seen.append((i, threading.get_ident()))
            return i * i

        results = await asyncio.gather(*(thread.run(job, i) for i in range(5)))
        assert results == [0, 1, 4, 9, 16]
        assert [i for i, _ in seen] == list(range(5))
        assert len({ident for _, ident in seen}) == 1 and seen[0][1] != threading.get_ident()
        worker = next(t for t in threading.enumerate() if t.ident == seen[0][1])
        assert worker.daemon and worker.name == "loraplex-engine"

        def fails() -> None:
            raise ValueError("bad weights")

        with pytest.raises(ValueError, match="bad weights"):
            await thread.run(fails)
        assert await thread.run(torch.get_num_threads) >= 1  # still serving after a failure
        assert thread.submit(lambda: "later").result(timeout=30) == "later"

    asyncio.run(main())
