"""The system metrics a job on this machine records, GPUs included, and what taking them costs.

Samples the GPUs the job would see (``CUDA_VISIBLE_DEVICES`` honoured) and this process's tree every
``--every`` seconds for ``--seconds``, printing each GPU sample, then the last process-tree sample and the
median cost of one sample of each (wall and CPU time of the sampling thread). Without NVIDIA's management
library or a driver it prints ``GPU metrics: SKIPPED`` and why, and exits 3 with ``--require-gpu``, so
that a GPU machine's check cannot pass without having read a GPU.

    python bench/gpu_metrics.py [--seconds 3] [--every 0.5] [--require-gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

from takeoff._system import GpuSampler, ProcessTreeSampler


def cost_ms(sample: Callable[[], dict[str, float]], times: int = 20) -> dict[str, float]:
    walls, cpus = [], []
    for _ in range(times):
        wall, cpu = time.perf_counter(), time.thread_time()
        sample()
        cpus.append(time.thread_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return {"wall_ms": statistics.median(walls) * 1000, "cpu_ms": statistics.median(cpus) * 1000}


def main(seconds: float, every: float, require_gpu: bool) -> int:
    tree = ProcessTreeSampler(os.getpid(), os.getcwd())
    gpus = GpuSampler.open()  # says on stderr why, when it returns None
    report: dict[str, object] = {"visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if gpus is None:
        print(
            "GPU metrics: SKIPPED (the 'takeoff: GPU metrics skipped: ...' line on stderr says why)",
            flush=True,
        )
    else:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            print(json.dumps(gpus.sample(), sort_keys=True), flush=True)
            time.sleep(every)
        report["gpu_sample"] = cost_ms(gpus.sample)
        if gpus.disabled:
            print("GPU metrics: STOPPED by an NVML error (see above)", flush=True)
        gpus.close()
    report["process_tree_sample"] = cost_ms(tree.sample)
    report["processes_on_machine"] = sum(entry.isdigit() for entry in os.listdir("/proc"))
    print(json.dumps(tree.sample(), sort_keys=True))
    print(json.dumps(report, indent=2))
    return 3 if require_gpu and (gpus is None or gpus.disabled) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--every", type=float, default=0.5)
    parser.add_argument("--require-gpu", action="store_true", help="exit 3 unless GPU metrics were read")
    arguments = parser.parse_args()
    sys.exit(main(arguments.seconds, arguments.every, arguments.require_gpu))
