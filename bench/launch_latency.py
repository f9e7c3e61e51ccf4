"""Launch latency: Enqueue sent -> first line of the job's code executed, for a cached local-process job.

Starts a local stack and an agent in a temporary TAKEOFF_HOME, creates a code job whose first statement
writes the time to a file, runs it once to warm the build cache, then launches it ``--launches`` times
one after another and reports p50/p90 (goal: p50 <= 300 ms). Prints JSON and a table.

    python bench/launch_latency.py [--launches 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import yaml

from takeoff.client import Client
from takeoff.stack import LocalStack
from takeoff.v1 import common_pb2, queue_pb2, queue_pb2_grpc

JOB = """\
import os, pathlib, time
pathlib.Path(os.environ["MARKS"], os.environ["TAKEOFF_ITEM"].rsplit("/", 1)[1]).write_text(repr(time.time()))
import takeoff
takeoff.init().finish()
"""
ENDED = {common_pb2.ITEM_STATE_SUCCEEDED, common_pb2.ITEM_STATE_FAILED, common_pb2.ITEM_STATE_CANCELLED}


def _wait_ended(queues: queue_pb2_grpc.QueueServiceStub, name: str) -> queue_pb2.Item:
    for update in queues.WatchItem(queue_pb2.WatchItemRequest(name=name)):
        if update.item.state in ENDED:
            return update.item
    raise RuntimeError(f"{name} stopped being watched before it ended")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--launches", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="takeoff-bench-") as directory:
        home = Path(directory)
        marks = home / "marks"
        marks.mkdir()
        os.environ["MARKS"] = str(marks)  # the stack's processes, and so the jobs, inherit it
        code = home / "code"
        code.mkdir()
        (code / "main.py").write_text(JOB)
        stack = LocalStack(home, base_port=0)
        record = stack.start()
        try:
            with Client(record.services["registry"].address, project="bench") as client:
                client.create_job_version("first-line", code, entrypoint=["python", "main.py"])
            with grpc.insecure_channel(record.services["queue"].address) as channel:
                queues = queue_pb2_grpc.QueueServiceStub(channel)
                queue = queues.CreateQueue(
                    queue_pb2.CreateQueueRequest(
                        parent="projects/bench",
                        queue_id="launch",
                        queue=queue_pb2.Queue(resource=common_pb2.RESOURCE_KIND_LOCAL_PROCESS),
                    )
                ).queue.name
                config = home / "agent.yaml"
                config.write_text(
                    yaml.safe_dump({"queues": [queue], "max_jobs": 1, "runners": {"local-process": {}}})
                )
                stack.start_agent(config)
                latencies = []
                for launch in range(args.launches + 1):  # the first run builds the venv: not timed
                    sent = time.time()
                    item = queues.Enqueue(queue_pb2.EnqueueRequest(queue=queue, job="first-line")).item
                    ended = _wait_ended(queues, item.name)
                    if ended.state != common_pb2.ITEM_STATE_SUCCEEDED:
                        raise RuntimeError(f"launch {launch} ended {ended.state}: {ended.message}")
                    if launch:
                        started = float((marks / item.name.rsplit("/", 1)[1]).read_text())
                        latencies.append((started - sent) * 1e3)
        finally:
            stack.stop()
    ordered = sorted(latencies)
    result = {
        "launches": len(ordered),
        "p50_ms": round(statistics.median(ordered), 1),
        "p90_ms": round(ordered[int(len(ordered) * 0.9) - 1], 1),
        "min_ms": round(ordered[0], 1),
        "max_ms": round(ordered[-1], 1),
    }
    print(json.dumps(result, indent=2))
    columns = ("launches", "p50_ms", "p90_ms", "min_ms", "max_ms")
    print("\n" + " ".join(f"{column:>9}" for column in columns))
    print(" ".join(f"{result[column]:>9}" for column in columns))


if __name__ == "__main__":
    main()
