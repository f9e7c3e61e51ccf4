"""Dispatch latency with a small and a large backlog: does the cost of a dispatch grow with the queue?

Runs bench/dispatch.py's measurement twice, with 100 and with 100,000 items waiting (``--large`` to
change it), and prints both and their p50 ratio (goal: at most 1.5). Filling the large backlog takes a
while: it goes through Enqueue like any client's items.

    python bench/depth.py [--items 500] [--large 100000]
"""

from __future__ import annotations

import argparse
import json

from dispatch import print_table, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=100_000)
    args = parser.parse_args()
    small, large = run(args.items, args.small), run(args.items, args.large)
    print_table([small, large])
    ratio = large["p50_ms"] / small["p50_ms"]
    print(json.dumps({"p50_ratio_large_over_small": round(ratio, 3)}))
    print(f"p50 ratio ({args.large} vs {args.small} waiting): {ratio:.2f}")


if __name__ == "__main__":
    main()
