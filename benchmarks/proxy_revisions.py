"""The proxy's CPU per request in two source trees, runs alternating.

Each run is ``benchmarks.proxy_load --duration 5 --rounds 1 --state none`` started
in a tree (a ``git worktree`` of a revision: the proxy it starts imports that
tree's ``keyrotor``), and the figure kept is the closed loop's CPU of the proxy
per request (its CPU % over its rps), JSON and SSE. Run:

    git worktree add /tmp/before HEAD~1 && git worktree add /tmp/after HEAD
    python -m benchmarks.proxy_revisions /tmp/before /tmp/after --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys


def cpu_per_request(tree: str) -> dict[str, float]:
    """body -> µs of proxy CPU per request in one proxy_load run in ``tree``."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.proxy_load", "--duration", "5", "--rounds", "1",
         "--state", "none"],
        cwd=tree, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    found = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 12 and cells[0] == "through keyrotor --no-state" and "closed" in cells[1]:
            rps, cpu = float(cells[6].replace(",", "")), float(cells[11].split("/")[2])
            found[cells[2]] = cpu / 100 / rps * 1e6
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs=2, metavar="TREE")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {tree: [] for tree in args.trees}
    for rnd in range(args.rounds):
        for tree in args.trees:
            runs[tree].append(cpu_per_request(tree))
            print(f"round {rnd + 1}: {tree}: {runs[tree][-1]}", file=sys.stderr, flush=True)
    print("| tree | body | µs of proxy CPU per request, each run | median |")
    print("|---|---|---|---:|")
    for tree, results in runs.items():
        for body in ("json", "stream"):
            values = [r[body] for r in results if body in r]
            if values:
                each = " / ".join(f"{v:.0f}" for v in values)
                print(f"| {tree} | {body} | {each} | {statistics.median(values):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
