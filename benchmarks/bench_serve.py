"""Load test of ``asmkit serve``: throughput, latency, errors and memory against 127.0.0.1.

Builds the index workspace once (``--images`` into ``--index``, skipped when ``--index``
exists), measures the in-process ``Index.search`` ceiling on the same queries, then starts
``asmkit serve`` as a subprocess on a free port of 127.0.0.1 and drives it with a bounded
asyncio client (httpx): ``--clients`` concurrent clients, each sending its next query as
soon as the last one is answered, for ``--duration`` seconds per (kind, clients) pair.

Query kinds: ``descriptors`` (the query image's RootSIFT as ``.npy``, float32) and
``image`` (the JPEG: the server extracts the features).

    python -m benchmarks.bench_serve --index ukb_index \\
        --images ../shared/datasets/ukbench2000/images --clients 8 32 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil

from asmkit.features import list_images
from asmkit.index import Index
from asmkit.pipeline import build_index
from asmkit.serve import ServedIndex

SRC = Path(__file__).resolve().parents[1] / "src"
BOUNDARY = "asmkit-bench-boundary"


def multipart(field: str, filename: str, data: bytes) -> bytes:
    """One-field multipart body, encoded once so that the client spends no time on it."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def npy_bytes(vecs: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, vecs, allow_pickle=False)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(index_dir: Path, n_queries: int) -> tuple[list[bytes], list[np.ndarray]]:
    """JPEG bytes and descriptors (extracted as the server would) of ``n_queries`` indexed
    images spread over the collection."""
    served = ServedIndex(index_dir)
    try:
        paths = list_images(served.image_root)
        chosen = paths[:: max(1, len(paths) // n_queries)][:n_queries]
        images = [p.read_bytes() for p in chosen]
        vecs = [served.featurize(data) for data in images]
    finally:
        served.close()
    return images, vecs


def ceiling(index: Index, vecs: list[np.ndarray], k: int, seconds: float, threads: int, batch: int) -> float:
    """Queries per second of ``Index.search`` in ``threads`` threads, ``batch`` queries a
    call. The threads are never the main thread, as the server's searcher is not: with
    OpenMP (faiss) oversubscribed, searches in the main thread ran several times slower
    than in another thread of the same process."""
    done = [0] * threads
    deadline = time.perf_counter() + seconds

    def loop(t: int) -> None:
        i = t * batch
        while time.perf_counter() < deadline:
            index.search([vecs[(i + j) % len(vecs)] for j in range(batch)], k=k)
            done[t] += batch
            i += threads * batch

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(loop, range(threads)))
    return sum(done) / (time.perf_counter() - t0)


class ServerProcess:
    def __init__(self, index_dir: Path, workers: int, max_batch: int, searchers: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "asmkit.cli",
                "-q",
                "serve",
                str(index_dir),
                "--port",
                str(self.port),
                "--workers",
                str(workers),
                "--max-batch",
                str(max_batch),
                "--searchers",
                str(searchers),
            ],
            env=env,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        else:
            self.proc.kill()
            raise SystemExit("server did not start within 300 s")
        self.ps = psutil.Process(self.proc.pid)
        self.peak_rss = self.ps.memory_info().rss
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_rss = max(self.peak_rss, self.ps.memory_info().rss)

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def stop(self) -> None:
        self._stop.set()
        self.proc.terminate()
        self.proc.wait(timeout=120)


class RawConnection:
    """HTTP/1.1 keep-alive on one asyncio stream, requests encoded once: a client that
    costs almost no CPU, to tell the server's limits from httpx's."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, request: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self.writer.write(request)
            await self.writer.drain()
            status = int((await self.reader.readline()).split()[1])
            length = 0
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            return status, await self.reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, IndexError, ValueError):
            self.close()
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def drive(
    url: str, bodies: list[bytes], clients: int, seconds: float, k: int, warmup: float, client_kind: str
) -> dict:
    """``clients`` closed-loop clients for ``warmup + seconds``; statistics over the last
    ``seconds``."""
    host, port = url.rsplit("/", 1)[1].split(":")
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    latencies: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    measure_from, deadline = start + warmup, start + warmup + seconds
    cpu0 = time.process_time()

    if client_kind == "httpx":
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        shared = httpx.AsyncClient(base_url=url, limits=limits, timeout=60)

        def connect():
            async def send(body: bytes) -> tuple[int, bytes]:
                response = await shared.post(f"/search?k={k}", content=body, headers={"Content-Type": content_type})
                return response.status_code, response.content

            return send, None
    else:
        shared = None
        requests = {
            id(body): (
                f"POST /search?k={k} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
            for body in bodies
        }

        def connect():
            connection = RawConnection(host, int(port))
            return (lambda body: connection.send(requests[id(body)])), connection

    async def one_client(c: int) -> None:
        send, connection = connect()
        i = c
        while (now := time.perf_counter()) < deadline:
            t0 = now
            try:
                status, content = await send(bodies[i % len(bodies)])
                ok, reason = status == 200, f"{status} {content[:200]!r}"
            except (httpx.HTTPError, OSError, asyncio.IncompleteReadError, IndexError, ValueError) as exc:
                ok, reason = False, repr(exc)
            t1 = time.perf_counter()
            if t0 >= measure_from and t1 <= deadline:
                latencies.append(t1 - t0)
                if not ok:
                    errors.append(reason)
            i += clients
        if connection is not None:
            connection.close()

    await asyncio.gather(*(one_client(c) for c in range(clients)))
    if shared is not None:
        await shared.aclose()
    lat = np.asarray(latencies) * 1000.0
    return {
        "client": client_kind,
        "requests": len(latencies),
        "throughput": len(latencies) / seconds,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "errors": len(errors),
        "first_errors": errors[:3],
        "client_cpu_ms_per_request": 1000.0 * (time.process_time() - cpu0) / max(len(latencies), 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True, type=Path, help="index workspace (built from --images if missing)")
    parser.add_argument("--images", type=Path, help="images to index when --index does not exist")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--kinds", nargs="+", default=["descriptors", "image"], choices=["descriptors", "image"])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--ceiling-seconds", type=float, default=10.0)
    parser.add_argument("--queries", type=int, default=100, help="distinct query images")
    parser.add_argument("--workers", type=int, default=4, help="the server's --workers")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    parser.add_argument("--searchers", type=int, default=2, help="the server's --searchers")
    parser.add_argument(
        "--client",
        nargs="+",
        default=["httpx"],
        choices=["httpx", "raw"],
        help="httpx.AsyncClient, and/or raw asyncio streams (requests encoded once)",
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    if not (args.index / "index.asmkit").exists():
        if args.images is None:
            parser.error("--index does not exist: give --images to build it")
        t0 = time.perf_counter()
        build_index(args.images, out=args.index)
        print(f"built {args.index} in {time.perf_counter() - t0:.0f} s", flush=True)

    images, vecs = prepare(args.index, args.queries)
    n_desc = np.array([len(v) for v in vecs])
    print(
        f"{len(vecs)} queries, {n_desc.mean():.0f} descriptors each on average "
        f"({np.mean([len(npy_bytes(v)) for v in vecs]) / 1e6:.2f} MB as .npy)",
        flush=True,
    )
    index = Index.load(args.index / "index.asmkit", mmap=False)
    index.search(vecs[:2], k=args.k)
    ceilings = {
        (threads, batch): ceiling(index, vecs, args.k, args.ceiling_seconds, threads, batch)
        for threads, batch in sorted({(1, 1), (args.workers, 1), (1, 8)})
    }
    # The ceiling of one query a call (what a request is), and of batched calls (what the
    # server's searcher makes of concurrent requests).
    best = max(q for (_, batch), q in ceilings.items() if batch == 1)
    batched = ceilings[(1, 8)]
    ceilings = {f"{threads} threads x {batch} queries a call": q for (threads, batch), q in ceilings.items()}
    print(
        "in-process Index.search ceiling: " + ", ".join(f"{q:.1f} q/s ({name})" for name, q in ceilings.items()),
        flush=True,
    )

    bodies = {
        "descriptors": [multipart("descriptors", "q.npy", npy_bytes(v)) for v in vecs],
        "image": [multipart("image", "q.jpg", data) for data in images],
    }
    server = ServerProcess(args.index, args.workers, args.max_batch, args.searchers)
    results = []
    try:
        idle_rss = server.rss()
        for kind in args.kinds:
            for clients in args.clients:
                for client in args.client:
                    run = asyncio.run(
                        drive(server.url, bodies[kind], clients, args.duration, args.k, args.warmup, client)
                    )
                    run.update(
                        kind=kind,
                        clients=clients,
                        server_rss_mb=server.rss() / 2**20,
                        ratio_to_ceiling=run["throughput"] / best,
                        ratio_to_batched_ceiling=run["throughput"] / batched,
                    )
                    results.append(run)
                    print(
                        f"{kind:11s} {clients:3d} clients ({client:5s}): {run['throughput']:7.1f} q/s, "
                        f"p50 {run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms, errors {run['errors']}, "
                        f"server RSS {run['server_rss_mb']:.0f} MB, client CPU "
                        f"{run['client_cpu_ms_per_request']:.2f} ms/request, "
                        f"{100 * run['ratio_to_ceiling']:.0f}% of the one-query ceiling, "
                        f"{100 * run['ratio_to_batched_ceiling']:.0f}% of the batched one",
                        flush=True,
                    )
        peak_rss = server.peak_rss
    finally:
        server.stop()
    # Measured again after the load: on a shared machine the ceiling moves with the load
    # of other processes, so the two brackets show how far.
    ceiling_after = ceiling(index, vecs, args.k, args.ceiling_seconds, 1, 1)
    print(f"in-process ceiling after the load: {ceiling_after:.1f} q/s (1 threads x 1 queries a call)")

    report = {
        "index": str(args.index),
        "images": len(Index.load(args.index / "index.asmkit", mmap=True)),
        "queries": len(vecs),
        "mean_descriptors": float(n_desc.mean()),
        "duration_s": args.duration,
        "server_workers": args.workers,
        "server_max_batch": args.max_batch,
        "server_searchers": args.searchers,
        "ceiling_qps": ceilings,
        "ceiling_qps_after": ceiling_after,
        "server_rss_idle_mb": idle_rss / 2**20,
        "server_rss_peak_mb": peak_rss / 2**20,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "runs": results,
    }
    print(f"server RSS: idle {report['server_rss_idle_mb']:.0f} MB, peak {report['server_rss_peak_mb']:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
