"""Cost of Takeoff's server runtime on a unary call, and of its access check (API key + method rule).

Two measurements, printed as JSON and tables:

* ``handler``: the access layer alone, in process: the same unary handler called directly and through
  ``access_handler`` (read the ``authorization`` metadata, verify the key through a warm
  :class:`CachedVerifier`, enforce a rule with a resource check on the request), µs per call. This is the
  per-call cost the access check adds, without the network's noise.
* ``round trip``: one aio client calling a trivial method sequentially on a loopback port of a bare
  ``grpc.aio`` server, of the Takeoff runtime with the access layer bypassed, and of the full runtime
  presenting a valid key (cache warm); the difference of the last two is the access check seen end to end,
  of which sending the key's metadata is measured on its own ("no access, key sent").

    python bench/interceptor_overhead.py [--calls 2000] [--handler-calls 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import grpc

import takeoff_server.server
from takeoff.v1 import runs_pb2
from takeoff_server.access import (
    CachedVerifier,
    KeyKind,
    KeyScope,
    Permission,
    Principal,
    ProjectRole,
    fields,
    grants_for,
    needs,
    secret_digest,
)
from takeoff_server.interceptors import AccessControl, access_handler
from takeoff_server.server import ServiceBinding, TakeoffServer

SERVICE = "takeoff.bench.EchoService"
METHOD = f"/{SERVICE}/Echo"
RULE = needs(Permission.RUNS_READ, fields("name"))
REQUEST = runs_pb2.GetRunRequest(name="projects/demo/runs/run-1")
SECRETS = {
    "project key": (
        "tko_bench-project_" + "p" * 43,
        KeyScope(KeyKind.PROJECT, ("projects/demo",), ProjectRole.WRITE),
    ),
    "admin key": ("tko_bench-admin_" + "a" * 43, KeyScope(KeyKind.ADMIN)),
}


class DictVerifier:
    """Keys by digest, as the registry's store finds them (only asked when the cache is cold)."""

    def __init__(self) -> None:
        self._keys = {
            secret_digest(secret): Principal(f"keys/{name}", name, scope.kind, grants_for(scope))
            for name, (secret, scope) in SECRETS.items()
        }

    async def verify(self, secret: str) -> Principal | None:
        return self._keys.get(secret_digest(secret))


async def echo(request: runs_pb2.GetRunRequest, context: Any) -> runs_pb2.GetRunRequest:
    return request


def _echo_handler() -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.unary_unary_rpc_method_handler(
        echo,
        request_deserializer=runs_pb2.GetRunRequest.FromString,
        response_serializer=runs_pb2.GetRunRequest.SerializeToString,
    )


def _generic() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE, {"Echo": _echo_handler()})


class _Context:
    """What the access layer reads of a servicer context."""

    def __init__(self, secret: str) -> None:
        self._metadata = (("authorization", f"Bearer {secret}"),)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


async def _per_call_us(call: Callable[[], Any], calls: int) -> float:
    for _ in range(1000):
        await call()
    best = float("inf")
    for _ in range(5):  # the best of five runs: least disturbed by other processes
        started = time.perf_counter()
        for _ in range(calls):
            await call()
        best = min(best, (time.perf_counter() - started) / calls * 1e6)
    return best


async def measure_handler(calls: int) -> dict[str, float]:
    control = AccessControl(CachedVerifier(DictVerifier()), {METHOD: RULE})
    plain = _echo_handler()
    guarded = access_handler(plain, METHOD, control)
    assert plain.unary_unary is not None
    assert guarded.unary_unary is not None
    plain_call: Callable[[Any, Any], Any] = plain.unary_unary
    guarded_call: Callable[[Any, Any], Any] = guarded.unary_unary
    anonymous = _Context("")
    results = {"without access check": await _per_call_us(lambda: plain_call(REQUEST, anonymous), calls)}
    for name, (secret, _) in SECRETS.items():
        context = _Context(secret)
        results[f"access check, {name}"] = await _per_call_us(partial(guarded_call, REQUEST, context), calls)
    return {name: round(value, 2) for name, value in results.items()}


async def _round_trips(address: str, calls: int, secret: str | None) -> list[float]:
    metadata = (("authorization", f"Bearer {secret}"),) if secret else None
    async with grpc.aio.insecure_channel(address) as channel:
        method = channel.unary_unary(
            METHOD,
            request_serializer=runs_pb2.GetRunRequest.SerializeToString,
            response_deserializer=runs_pb2.GetRunRequest.FromString,
        )
        for _ in range(300):  # warm-up: connection, HTTP/2 windows, code paths, the key cache
            await method(REQUEST, metadata=metadata)
        latencies = []
        for _ in range(calls):
            started = time.perf_counter()
            await method(REQUEST, metadata=metadata)
            latencies.append((time.perf_counter() - started) * 1e6)
    return latencies


def _summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "p50_us": round(statistics.median(ordered), 1),
        "p99_us": round(ordered[int(len(ordered) * 0.99) - 1], 1),
        "mean_us": round(statistics.fmean(ordered), 1),
    }


async def _check_refused_without_key(address: str) -> None:
    try:
        await _round_trips(address, 1, None)
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.UNAUTHENTICATED:
            raise
    else:
        raise AssertionError("the server with access control took a call without a key")


def _takeoff_server() -> TakeoffServer:
    binding = ServiceBinding(
        SERVICE, lambda server: server.add_generic_rpc_handlers((_generic(),)), access={"Echo": RULE}
    )
    return TakeoffServer([binding], listen=["127.0.0.1:0"], verifier=CachedVerifier(DictVerifier()))


async def measure_round_trips(calls: int) -> dict[str, dict[str, float]]:
    bare = grpc.aio.server()
    bare.add_generic_rpc_handlers((_generic(),))
    bare_port = bare.add_insecure_port("127.0.0.1:0")
    await bare.start()
    with_access, without_access = _takeoff_server(), _takeoff_server()
    addresses = [(await server.start())[0] for server in (with_access, without_access)]
    # Each server wraps a method's handler on its first call and keeps it: the first wraps with the access
    # layer, the second (while it is swapped out) without.
    await _check_refused_without_key(addresses[0])
    server_globals = vars(takeoff_server.server)
    original = server_globals["access_handler"]
    server_globals["access_handler"] = lambda handler, method, control: handler
    try:
        await _round_trips(addresses[1], 1, None)
    finally:
        server_globals["access_handler"] = original
    await _check_refused_without_key(addresses[0])
    secret = SECRETS["project key"][0]
    try:
        servers = {
            "bare grpc.aio": (f"127.0.0.1:{bare_port}", None),
            "takeoff, no access": (addresses[1], None),
            "takeoff, no access, key sent": (addresses[1], secret),
            "takeoff, project key": (addresses[0], secret),
        }
        samples: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(3):  # interleaved rounds, so that load from elsewhere hits each alike
            for name, (address, key) in servers.items():
                samples[name] += await _round_trips(address, calls // 3, key)
    finally:
        await bare.stop(0)
        await with_access.stop(0)
        await without_access.stop(0)
    return {name: _summary(latencies) for name, latencies in samples.items()}


async def main(calls: int, handler_calls: int) -> None:
    handler = await measure_handler(handler_calls)
    round_trip = await measure_round_trips(calls)
    added_handler = (
        max(v for k, v in handler.items() if k.startswith("access")) - handler["without access check"]
    )
    added_round_trip = (
        round_trip["takeoff, project key"]["p50_us"] - round_trip["takeoff, no access"]["p50_us"]
    )
    print(
        json.dumps(
            {
                "calls": calls,
                "handler_us_per_call": handler,
                "round_trip": round_trip,
                "access_check_added_us": {
                    "handler (worst key)": round(added_handler, 2),
                    "round trip p50": round(added_round_trip, 1),
                },
                "goal_us": 50,
            },
            indent=2,
        )
    )
    print(f"\n{'handler, in process':<32}{'µs/call':>10}")
    for name, value in handler.items():
        print(f"{name:<32}{value:>10.2f}")
    print(f"\n{'round trip':<32}{'p50 µs':>10}{'p99 µs':>10}{'mean µs':>10}")
    for name, row in round_trip.items():
        print(f"{name:<32}{row['p50_us']:>10.1f}{row['p99_us']:>10.1f}{row['mean_us']:>10.1f}")
    print(
        f"\naccess check added: {added_handler:.1f} µs/call in the handler, "
        f"{added_round_trip:.1f} µs p50 round trip"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--handler-calls", type=int, default=20000)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.calls, arguments.handler_calls))
