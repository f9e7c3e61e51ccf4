"""Build cache: how long a cache-hit Build call takes (goal: under 100 ms, nothing rebuilt), and how long the
example job (examples/train) takes to build cold, for reference.

Starts a local stack in a temporary TAKEOFF_HOME, creates the example job with its requirements, builds it
cold as a venv, then makes ``--hits`` Build calls one after another and times each from the request to
the stream's last event. With a Docker engine and a local base image (``--base-image``, default
``TAKEOFF_TEST_BASE_IMAGE``; .ci/docker-setup.sh makes one) it does the same for an image build, the
cold one with ``no_cache`` so that the engine's layer cache does not help. Prints JSON and a table.

    python bench/build_cache.py [--hits 50] [--base-image takeoff-python:bookworm]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import docker

from takeoff.client import Client
from takeoff.models import Environment
from takeoff.stack import LocalStack
from takeoff.v1 import build_pb2, build_pb2_grpc
from takeoff_rpc.channels import open_channel

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train"
BENCH_REPOSITORY = "takeoff-bench"


def build(builds: build_pb2_grpc.BuildServiceStub, request: build_pb2.BuildRequest) -> tuple[float, bool]:
    """Seconds from the request to the last event, and whether it was a cache hit."""
    started = time.perf_counter()
    events = list(builds.Build(request, timeout=1800))
    elapsed = time.perf_counter() - started
    last = events[-1]
    if not last.HasField("result"):
        raise RuntimeError(f"the build failed: {last.failure}")
    return elapsed, last.result.cache_hit


def measure(builds: build_pb2_grpc.BuildServiceStub, version: str, kind: str, hits: int) -> dict[str, float]:
    kind_number = build_pb2.BuildKind.Value(f"BUILD_KIND_{kind.upper()}")
    cold, was_hit = build(
        builds,
        build_pb2.BuildRequest(
            job_version=version, kind=kind_number, options=build_pb2.BuildOptions(no_cache=True)
        ),
    )
    assert not was_hit
    latencies = []
    for _ in range(hits):
        elapsed, was_hit = build(builds, build_pb2.BuildRequest(job_version=version, kind=kind_number))
        if not was_hit:
            raise RuntimeError("a repeated build was not a cache hit")
        latencies.append(elapsed * 1e3)
    ordered = sorted(latencies)
    return {
        "cold_build_s": round(cold, 2),
        "hit_p50_ms": round(statistics.median(ordered), 1),
        "hit_p95_ms": round(ordered[max(int(len(ordered) * 0.95) - 1, 0)], 1),
        "hit_max_ms": round(ordered[-1], 1),
    }


def remove_bench_images() -> None:
    engine = docker.from_env(timeout=60)
    for image in engine.images.list(name=f"{BENCH_REPOSITORY}/*"):
        for tag in image.tags:
            engine.images.remove(tag, force=True)


def docker_has(image: str) -> bool:
    try:
        engine = docker.from_env(timeout=10)
        return bool(image) and bool(engine.images.list(name=image))
    except docker.errors.DockerException:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--hits", type=int, default=50)
    parser.add_argument("--base-image", default=os.environ.get("TAKEOFF_TEST_BASE_IMAGE", ""))
    args = parser.parse_args()
    with_images = docker_has(args.base_image)
    if with_images:  # the stack's builder inherits these
        os.environ["TAKEOFF_DEFAULT_BASE_IMAGE"] = args.base_image
        os.environ["TAKEOFF_IMAGE_REPOSITORY"] = BENCH_REPOSITORY
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="takeoff-bench-") as directory:
        stack = LocalStack(Path(directory), base_port=0)
        record = stack.start()
        try:
            with Client(
                record.services["registry"].address, project="bench", api_key=stack.admin_key
            ) as client:
                version = client.create_job_version(
                    "train",
                    EXAMPLE,
                    entrypoint=["python", "train.py"],
                    environment=Environment(requirements=(EXAMPLE / "requirements.txt").read_text()),
                ).version.name
            with open_channel(record.services["builder"].address, api_key=stack.admin_key) as channel:
                builds = build_pb2_grpc.BuildServiceStub(channel)
                results["venv"] = measure(builds, version, "venv", args.hits)
                if with_images:
                    results["image"] = measure(builds, version, "image", args.hits)
        finally:
            stack.stop()
            if with_images:
                remove_bench_images()
    if not with_images:
        print("(no Docker engine or base image: image builds not measured; see .ci/docker-setup.sh)")
    print(json.dumps(results, indent=2))
    columns = ("cold_build_s", "hit_p50_ms", "hit_p95_ms", "hit_max_ms")
    print("\n" + f"{'kind':>6} " + " ".join(f"{column:>12}" for column in columns))
    for kind, numbers in results.items():
        print(f"{kind:>6} " + " ".join(f"{numbers[column]:>12}" for column in columns))


if __name__ == "__main__":
    main()
