"""Loader threads run on any CPU the process may use, whatever their creator is pinned to.

vLLM's CPU worker pins its main thread (an OpenMP thread) to the core it computes on, and a new thread
inherits that: a loader pinned there could not issue a read while the layer computes.
"""

from __future__ import annotations

import os
import threading

import pytest

from vllm_moe_offload.runtime.transfer import ThreadTransferEngine

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a process allowed on 2 CPUs or more")


def test_loaders_made_by_a_pinned_thread_float_over_every_cpu():
    allowed = os.sched_getaffinity(0)
    got: dict = {}

    def pinned_creator():  # plays the worker's main thread, pinned to one core by vLLM's OpenMP binding
        os.sched_setaffinity(0, {min(allowed)})
        engine = ThreadTransferEngine(2)
        try:
            got["creator"] = os.sched_getaffinity(0)
            got["loads"] = [engine.submit(os.sched_getaffinity, 0).result(timeout=10) for _ in range(4)]
        finally:
            engine.shutdown()

    thread = threading.Thread(target=pinned_creator)
    thread.start()
    thread.join()
    assert got["creator"] == {min(allowed)}
    assert got["loads"] == [allowed] * 4
