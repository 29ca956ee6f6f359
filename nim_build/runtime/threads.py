"""Keep PyTorch's CPU work on one OpenMP team per process.

libgomp (PyTorch's OpenMP) gives every thread that runs parallel work a team of worker threads of its own, kept
until that thread exits. Once the process has more OpenMP threads than CPUs, libgomp throttles spinning: a worker
sleeps between parallel regions instead of waiting hot, and waking it costs tens of microseconds. An engine step
runs hundreds of small parallel ops (per-sequence attention tiles), so a step loop on a background thread whose
process had also loaded the weights on its main thread ran 1.7x slower (measured on 2 CPUs: 110 -> 190 ms per
step of 16 sequences; bmm 12 -> 70 us, softmax 5 -> 67 us). Loading on a thread that ends frees its team.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def on_own_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) on a new thread that ends when it returns; its result or exception is the caller's."""
    with ThreadPoolExecutor(1, thread_name_prefix="nim_build-load") as pool:  # leaving it joins the thread
        return pool.submit(fn, *args, **kwargs).result()
