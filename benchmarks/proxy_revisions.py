"""The proxy's CPU per request in two source trees, runs alternating.

Each run is ``benchmarks.proxy_load --duration 5 --rounds 1 --state none`` (the
seconds set by ``--duration``) started in a tree (a ``git worktree`` of a
revision: the proxy it starts imports that tree's ``keyrotor``), the trees in
turn and their order swapped each round (A B, B A, ...). The figure kept is the
closed loop's CPU of the proxy per request, JSON and SSE: from the report's notes
(the proxy's CPU seconds over its successes, in µs), or, where a tree's report
has no such note, from its whole-number CPU % over its rps. ``--state file``
keeps the proxy's state file; ``--keys N`` measures the proxy with a pool of N
keys (``proxy_load --keys N --no-stream``: JSON only, and its p99); ``--tls`` the
proxy in front of an HTTPS upstream (``proxy_load --tls``, its state file on). Run:

    git worktree add /tmp/before HEAD~1 && git worktree add /tmp/after HEAD
    python -m benchmarks.proxy_revisions /tmp/before /tmp/after --rounds 3 \
        [--state file] [--keys 10000] [--tls]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys


def cpu_per_request(
    tree: str, state: str = "none", keys: int = 0, tls: bool = False, duration: float = 5.0
) -> dict[str, float]:
    """body -> µs of proxy CPU per request in one proxy_load run in ``tree``
    (with ``keys``: "json" and "p99", ms, of the proxy with that many keys;
    with ``tls``: of the proxy in front of the HTTPS upstream)."""
    command = [sys.executable, "-m", "benchmarks.proxy_load", "--duration", f"{duration:g}",
               "--rounds", "1", "--state", state]  # fmt: skip
    name = "through keyrotor" + ("" if state == "file" else " --no-state")
    column = 2  # the proxy's CPU % follows the generator's and the upstream's
    if keys:
        command += ["--keys", str(keys), "--no-stream"]
        name = f"through keyrotor, {keys:,} keys" + ("" if state == "file" else " --no-state")
        column = 3  # after the 4-key proxy's
    if tls:
        command.append("--tls")
        name = "through keyrotor, HTTPS upstream"
        column = 4  # after the HTTPS upstream's and the plain proxy's
    out = subprocess.run(command, cwd=tree, capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 12 and cells[0] == name and "closed" in cells[1]:
            rps, cpu = float(cells[6].replace(",", "")), float(cells[11].split("/")[column])
            found[cells[2]] = cpu / 100 / rps * 1e6
            if keys:
                found["p99"] = float(cells[9])
    found.update(_noted_cpu(out, name))  # from the raw CPU seconds, where the report has them
    return found


def _noted_cpu(report: str, name: str) -> dict[str, float]:
    """body -> µs of ``name``'s CPU a request in its closed-loop runs, from the
    report's notes ("- NAME, closed 32, json, round 1: ...; CPU per request (µs...):
    generator 120, upstream 60, NAME 230; ..."); empty for a report without them."""
    found = {}
    note = re.compile(rf"- {re.escape(name)}, closed \d+, (\w+), round \d+: ")
    figure = re.compile(rf"(?:^|, ){re.escape(name)} (\d+)(?:,|$)")
    for line in report.splitlines():
        body = note.match(line)
        cpu = re.search(r"CPU per request \([^)]*\): ([^;]*)", line)
        value = figure.search(cpu.group(1)) if body and cpu else None
        if body and value:
            found[body.group(1)] = float(value.group(1))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs=2, metavar="TREE")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--state", choices=("none", "file"), default="none")
    parser.add_argument("--keys", type=int, default=0, metavar="N")
    parser.add_argument("--tls", action="store_true", help="the proxy on an HTTPS upstream")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds a run (5)")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {tree: [] for tree in args.trees}
    for rnd in range(args.rounds):
        for tree in args.trees if rnd % 2 == 0 else args.trees[::-1]:  # A B, B A, ...
            runs[tree].append(cpu_per_request(tree, args.state, args.keys, args.tls, args.duration))
            print(f"round {rnd + 1}: {tree}: {runs[tree][-1]}", file=sys.stderr, flush=True)
    print("| tree | body | µs of proxy CPU per request, each run | median |")
    print("|---|---|---|---:|")
    for tree, results in runs.items():
        for body in ("json", "stream", "p99"):
            values = [r[body] for r in results if body in r]
            if values:
                each = " / ".join(f"{v:.0f}" for v in values)
                body = "p99 ms (JSON)" if body == "p99" else body
                print(f"| {tree} | {body} | {each} | {statistics.median(values):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
