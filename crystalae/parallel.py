"""Map a function over chunks in worker processes, with a progress bar; results come back in order."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["default_workers", "map_chunks"]

T = TypeVar("T")


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def map_chunks(
    fn: Callable[..., T], chunks: Sequence[Any], workers: int, desc: str, sizes: Sequence[int] | None = None
) -> Iterator[T]:
    """Yield fn(chunk) for each chunk in order; the bar counts items (`sizes`) rather than chunks."""
    sizes = list(sizes) if sizes is not None else [1] * len(chunks)
    with tqdm(total=sum(sizes), desc=desc, unit="structure", disable=None) as bar:
        if workers <= 1 or len(chunks) <= 1:
            for chunk, size in zip(chunks, sizes):
                yield fn(chunk)
                bar.update(size)
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for result, size in zip(pool.map(fn, chunks), sizes):
                yield result
                bar.update(size)
