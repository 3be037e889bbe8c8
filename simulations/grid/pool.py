"""One pool interface for a grid's cells: in this process, on Ray (local or a cluster), or on local processes.

Every pool has `imap_unordered(func, items)` and is a context manager, as `multiprocessing.Pool` is:
  - one worker and no address: this process, one cell after another (what tests and debuggers want);
  - Ray importable: `ray.util.multiprocessing.Pool`, on a new local Ray or on the cluster at `address`, each worker
    an actor with the grid's per-cell resources (e.g. {"num_cpus": 1, "num_gpus": 0.25});
  - no Ray: `multiprocessing` worker processes (spawned, so CUDA works in them), the resources unused.
"""

from __future__ import annotations

import importlib.util
import math
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class Pool(Protocol):
    def imap_unordered(self, func: Callable[[Any], Any], iterable: Iterable[Any]) -> Iterator[Any]: ...


class SerialPool:
    """The pool interface in this process."""

    def imap_unordered(self, func: Callable[[Any], Any], iterable: Iterable[Any]) -> Iterator[Any]:
        return map(func, iterable)


def has_ray() -> bool:
    return importlib.util.find_spec("ray") is not None


@contextmanager
def open_pool(workers: int = 1, address: str | None = None, resources: dict[str, float] | None = None,
              use_ray: bool | None = None) -> Iterator[Pool]:
    """A pool of `workers` (see the module docstring); `use_ray` None: Ray when it is importable."""
    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    if workers == 1 and address is None:
        yield SerialPool()
        return
    if use_ray is None:
        use_ray = has_ray()
    if not use_ray:
        if address is not None:
            raise ValueError(f"--address {address}: a cluster needs Ray, which is not installed here")
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            yield pool
        return
    import ray
    from ray.util.multiprocessing import Pool as RayPool

    resources = dict(resources or {})
    started = not ray.is_initialized()
    if started and address is None:  # a local Ray with room for every worker's CPUs (its GPUs are found)
        ray.init(num_cpus=math.ceil(workers * resources.get("num_cpus", 1)), include_dashboard=False)
    pool = RayPool(workers, ray_address=address, ray_remote_args=resources)
    try:
        yield pool
    finally:
        pool.terminate()
        if started:
            ray.shutdown()
