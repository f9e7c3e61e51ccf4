"""What Prometheus metrics cost a server (docs/design.md §9, "Metrics"), printed as JSON and a table.

* ``per call``: a trivial unary handler called in process, bare and wrapped by the RPC metrics
  (``measured_handler``: calls in flight, latency by status code), best of ``--rounds`` runs of ``--calls``.
* ``page``: one scrape's page for ``--services`` x ``--methods`` x 3 status codes histogram series:
  collecting the samples and formatting them (the endpoint does both in a worker thread), and its size.

    python bench/metrics_overhead.py [--calls 50000] [--rounds 7] [--services 4] [--methods 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import grpc
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from takeoff_server.metrics import RpcMetrics, measured_handler, process_registry

METHOD = "/takeoff.bench.EchoService/Echo"


async def echo(request: bytes, context: Any) -> bytes:
    return request


class Context:
    """What the wrapper asks of a servicer context: the status a handler set (none)."""

    def code(self) -> None:
        return None


async def per_call_us(handler: grpc.RpcMethodHandler[bytes, bytes], calls: int, rounds: int) -> float:
    behavior: Any = handler.unary_unary  # an async callable here: grpc's stubs type it as a sync one
    best = float("inf")
    context = Context()
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            await behavior(b"x", context)
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


class Collected:
    """Samples already collected, for timing the formatting alone."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.families = list(registry.collect())

    def collect(self) -> list[Any]:
        return self.families


def page(services: int, methods: int, rounds: int) -> dict[str, float]:
    rpc = RpcMetrics()
    for service in range(services):
        for method in range(methods):
            for code in ("OK", "NOT_FOUND", "INVALID_ARGUMENT"):
                rpc.handling.labels(f"takeoff.v1.S{service}", f"M{method}", "unary", code).observe(0.001)
    registry = process_registry(rpc.collectors)
    collect_ms = format_ms = float("inf")
    body = b""
    for _ in range(rounds):
        start = time.perf_counter()
        collected = Collected(registry)
        collect_ms = min(collect_ms, (time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        body = generate_latest(collected)
        format_ms = min(format_ms, (time.perf_counter() - start) * 1e3)
    return {
        "series": services * methods * 3,
        "bytes": len(body),
        "collect_ms": round(collect_ms, 2),
        "format_ms": round(format_ms, 2),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--services", type=int, default=4)
    parser.add_argument("--methods", type=int, default=15)
    args = parser.parse_args()
    bare: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(echo)
    measured = measured_handler(bare, METHOD, RpcMetrics())
    results = {
        "per_call_us": {
            "bare": round(await per_call_us(bare, args.calls, args.rounds), 2),
            "measured": round(await per_call_us(measured, args.calls, args.rounds), 2),
        },
        "page": page(args.services, args.methods, args.rounds),
    }
    print(json.dumps(results))
    calls = results["per_call_us"]
    print(f"\n{'per call, in process':32s} {'µs':>8s}")
    print(f"{'bare handler':32s} {calls['bare']:8.2f}")
    print(f"{'with RPC metrics':32s} {calls['measured']:8.2f}")
    print(f"{'added':32s} {calls['measured'] - calls['bare']:8.2f}")
    shown = results["page"]
    print(f"\npage of {shown['series']} histogram series: {shown['bytes']} bytes")
    print(f"collect {shown['collect_ms']} ms, format {shown['format_ms']} ms (in a worker thread)")


if __name__ == "__main__":
    asyncio.run(main())
