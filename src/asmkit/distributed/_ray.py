"""Ray itself: the optional import, the connection to a cluster, tasks that quantize as
the driver does, and task results with a progress bar.

Nothing here is imported by the engine; ``import ray`` happens on first use, so that
``import asmkit.distributed`` works without Ray and the error names the install command.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from .._validation import ArgumentError, AsmkitError, check_float, check_int
from ..quantizer import set_settle_threads, settle_threads

__all__ = [
    "INSTALL",
    "ClusterUnreachableError",
    "Connection",
    "RayNotInstalledError",
    "connect",
    "remote_task",
    "require_ray",
]

logger = logging.getLogger(__name__)

INSTALL = "pip install 'asmkit[ray]'"
#: Addresses that start a local cluster instead of joining one.
_LOCAL = (None, "auto", "local")


class RayNotInstalledError(AsmkitError, ImportError):
    """Ray is not installed; the message gives the install command."""


class ClusterUnreachableError(AsmkitError, ConnectionError):
    """No Ray cluster answers at the given address; the message names it."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"ray address {address}: {reason}")
        self.address = address


def require_ray():
    """The ``ray`` module.

    Raises
    ------
    RayNotInstalledError
        Ray cannot be imported (the message says ``pip install 'asmkit[ray]'``).
    """
    try:
        import ray
    except ImportError as exc:
        raise RayNotInstalledError(f"Ray is not installed ({exc}); install it with: {INSTALL}") from None
    return ray


def _with_settle_threads(threads: int, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a worker, tied rows settled on ``threads`` faiss threads."""
    set_settle_threads(threads)
    return fn(*args)


class _RemoteTask:
    """A Ray task of ``fn`` whose calls carry the driver's ``settle_threads()`` (see
    :func:`remote_task`)."""

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any]) -> None:
        ray = require_ray()
        self._task = (ray.remote(**options) if options else ray.remote)(_with_settle_threads)
        self._fn = fn
        self._threads = settle_threads()

    def remote(self, *args: Any):
        """The object ref of ``fn(*args)`` run on the cluster."""
        return self._task.remote(self._threads, self._fn, *args)


def remote_task(fn: Callable[..., Any], **options: Any) -> _RemoteTask:
    """``ray.remote(**options)(fn)``, with tied rows quantized in the worker on the driver's
    faiss thread count (``asmkit.quantizer.set_settle_threads``): a Ray worker runs faiss
    on one thread, and faiss's words for a tie depend on its thread count, so the worker
    gives the words the driver would. ``fn`` must be picklable (a module-level function)."""
    return _RemoteTask(fn, options)


def _host_port(address: str) -> tuple[str, int]:
    """(host, port) of ``host:port``, ``ray://host:port`` or ``[v6]:port``."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ArgumentError(f"address: expected host:port (or ray://host:port), got {address!r}")
    return host.strip("[]"), int(port)


def _probe(address: str, timeout: float) -> None:
    """Open and close a TCP connection to the cluster's head.

    ``ray.init`` retries an address where nothing listens for minutes (20 attempts of
    about 40 s each in Ray 2.60, measured against 127.0.0.1:1), and shortening its own
    GCS timeouts makes the process abort; a plain socket fails within ``timeout``.
    """
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise ClusterUnreachableError(
            address, f"no Ray cluster answers within {timeout:g} s ({type(exc).__name__}: {exc})"
        ) from None


class Connection:
    """A connection made by :func:`connect`; ``close`` shuts Ray down only when this
    connection started it (a cluster already joined by the caller stays up).

    Usable as a context manager.
    """

    def __init__(self, ray, started: bool, address: str | None) -> None:
        self._ray = ray
        self.started = started
        self.address = address

    def resources(self) -> dict[str, float]:
        """The cluster's total resources (``{"CPU": 2.0, "GPU": 1.0, ...}``)."""
        return dict(self._ray.cluster_resources())

    def close(self) -> None:
        if self.started and self._ray.is_initialized():
            self._ray.shutdown()
        self.started = False

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(
    address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None, timeout: float = 10.0
) -> Connection:
    """Join a Ray cluster, or start a local one.

    Parameters
    ----------
    address : str, optional
        ``None``, ``"auto"`` or ``"local"``: start a local cluster (no dashboard) in this
        process. ``host:port`` (a head's GCS port, 6379 by default) or
        ``ray://host:port`` (Ray Client): join that cluster. When Ray is already
        initialised in this process, that connection is used whatever the address.
    num_cpus, num_gpus : int, optional
        Resources of a local cluster (default: Ray's detection). Ignored when joining.
    timeout : float
        Seconds to wait for a remote cluster's head to accept a connection.

    Returns
    -------
    Connection

    Raises
    ------
    RayNotInstalledError
        Ray is not installed.
    ClusterUnreachableError
        Nothing accepts a connection at ``address`` within ``timeout`` seconds.
    ArgumentError
        A malformed address or resource count.
    """
    ray = require_ray()
    num_cpus = check_int(num_cpus, "num_cpus", min=1, none=True)
    num_gpus = check_int(num_gpus, "num_gpus", min=0, none=True)
    timeout = check_float(timeout, "timeout", min=0.0, min_open=True)
    if address is not None and not isinstance(address, str):
        raise ArgumentError(f"address: expected a str or None, got {address!r}")
    if ray.is_initialized():
        return Connection(ray, False, address)
    if address in _LOCAL:
        start = time.perf_counter()
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False)
        logger.info("started a local Ray cluster in %.1f s: %s", time.perf_counter() - start, ray.cluster_resources())
        return Connection(ray, True, None)
    _probe(address, timeout)
    ray.init(address=address, log_to_driver=False)
    logger.info("joined the Ray cluster at %s: %s", address, ray.cluster_resources())
    return Connection(ray, True, address)


def unwrap(error: BaseException) -> BaseException:
    """The user-facing error inside a Ray task error: an asmkit, file or value error that
    a task raised is raised as itself, without Ray's wrapper and remote traceback."""
    ray = require_ray()
    cause = getattr(error, "cause", None) if isinstance(error, ray.exceptions.RayTaskError) else None
    if isinstance(cause, (AsmkitError, OSError, ValueError)):
        return cause
    return error


def gather(
    refs: Sequence[Any],
    *,
    desc: str,
    total: int | None = None,
    weights: Sequence[int] | None = None,
    progress: bool = True,
    on_result: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """Wait for task results as they arrive, advancing one tqdm bar on the driver.

    Parameters
    ----------
    refs : sequence of ray.ObjectRef
        One per task.
    desc : str
        The bar's label.
    total : int, optional
        The bar's total (default ``len(refs)``); with ``weights`` the sum of the items.
    weights : sequence of int, optional
        Items per task (images, queries), so that the bar counts items, not tasks.
    progress : bool
        Show the bar.
    on_result : callable(i, result), optional
        Called on each result as it arrives (``i`` is its position in ``refs``).

    Returns
    -------
    list
        The results in ``refs`` order.

    Raises
    ------
    The error of the first failed task (see :func:`unwrap`), after cancelling the others.
    """
    ray = require_ray()
    weights = [1] * len(refs) if weights is None else list(weights)
    position = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    with tqdm(total=sum(weights) if total is None else total, desc=desc, disable=not progress, unit="img") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = position[done[0]]
            try:
                results[i] = ray.get(done[0])
            except Exception as error:
                for ref in pending:
                    ray.cancel(ref, force=False)
                raise unwrap(error) from None
            if on_result is not None:
                on_result(i, results[i])
            bar.update(weights[i])
    return results
