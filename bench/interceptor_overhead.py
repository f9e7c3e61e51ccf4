"""Cost of Takeoff's server runtime on a unary call: tracing + error + auth interceptors vs a bare server.

Prints JSON and a table. Each server answers a trivial method on a loopback port; one aio client calls
it sequentially, so the numbers are round-trip latencies on this machine.

    python bench/interceptor_overhead.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import grpc

from takeoff_server.server import ServiceBinding, TakeoffServer

SERVICE = "takeoff.bench.EchoService"


async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


def _handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)})


async def _measure(address: str, calls: int) -> list[float]:
    async with grpc.aio.insecure_channel(address) as channel:
        method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{SERVICE}/Echo")
        for _ in range(200):  # warm-up: connection, HTTP/2 windows, code paths
            await method(b"x")
        latencies = []
        for _ in range(calls):
            started = time.perf_counter()
            await method(b"x")
            latencies.append((time.perf_counter() - started) * 1e3)
    return latencies


def _summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "p50_ms": round(statistics.median(ordered), 4),
        "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1], 4),
        "mean_ms": round(statistics.fmean(ordered), 4),
    }


async def main(calls: int) -> None:
    bare = grpc.aio.server()
    bare.add_generic_rpc_handlers((_handler(),))
    bare_port = bare.add_insecure_port("127.0.0.1:0")
    await bare.start()
    takeoff = TakeoffServer(
        [ServiceBinding(SERVICE, lambda s: s.add_generic_rpc_handlers((_handler(),)))], listen=["127.0.0.1:0"]
    )
    takeoff_address = (await takeoff.start())[0]
    try:
        results = {
            "bare grpc.aio": _summary(await _measure(f"127.0.0.1:{bare_port}", calls)),
            "takeoff runtime": _summary(await _measure(takeoff_address, calls)),
        }
    finally:
        await bare.stop(0)
        await takeoff.stop(0)
    print(json.dumps({"calls": calls, "results": results}, indent=2))
    print(f"\n{'server':<18}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name, row in results.items():
        print(f"{name:<18}{row['p50_ms']:>10.3f}{row['p99_ms']:>10.3f}{row['mean_ms']:>10.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    asyncio.run(main(parser.parse_args().calls))
