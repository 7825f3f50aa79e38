"""Where the proxy's CPU goes: ``keyrotor serve`` under cProfile, closed-loop load.

The fake upstream in its own process, the proxy (``--no-state`` or with its state
file, 4 fake keys) with a ``cProfile.Profile`` that is off until the harness
sends SIGUSR1 (after start-up and warm-up, just before the timed load) and off
again at SIGUSR2 (just after it; the proxy then writes the figures): only the
measured window is profiled, not the imports, compiling, warm-up or shutdown.
The load generator of ``proxy_load`` (32 keep-alive connections back to back).
Prints the CPU of the proxy per request (user and system, from /proc over the
window, the profiler's own cost included: compare runs of this script, not with
proxy_load) and the functions with the most time of their own and in all.
``--no-profile`` runs the proxy without cProfile and prints only its user and
system CPU a request over the window (the figures proxy_load's CPU is made of).

Run:

    python -m benchmarks.profile_proxy --duration 10 --stream
    python -m benchmarks.profile_proxy --duration 10 --open 200   # a light load's wake-ups
    python -m benchmarks.profile_proxy --duration 10 --open 200 --no-profile  # user/system
    python -m benchmarks.profile_proxy --duration 10 --route      # requests naming a route
"""

from __future__ import annotations

import argparse
import os
import pstats
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from benchmarks.proxy_load import (
    FAKE_KEYS,
    LOOPBACK,
    MODEL,
    ROUTE,
    ROUTE_CONFIG,
    BenchError,
    Child,
    Endpoint,
    Mode,
    Options,
    Target,
    _child_env,
    child,
    cpu_times,
    fake_keys_config,
    free_port,
    measure,
    run_main,
    start_upstream,
    wait_ready,
    warm_up,
)

# The proxy's process: keyrotor's CLI with a profiler that SIGUSR1 turns on and
# SIGUSR2 turns off and saves (to the path in argv[1]), each saying so on stderr.
RUN = """\
import cProfile, signal, sys
out = sys.argv.pop(1)
profile = cProfile.Profile()
def start(signum, frame):
    profile.enable()
    sys.stderr.write("profile: on\\n")
    sys.stderr.flush()
def stop(signum, frame):
    profile.disable()
    profile.dump_stats(out)
    sys.stderr.write("profile: saved\\n")
    sys.stderr.flush()
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, stop)
from keyrotor.cli import main
sys.exit(main())
"""
SIGNAL_TIMEOUT = 60.0  # for the proxy to say it turned the profiler on, or saved it


_PARTS = (
    ("/keyrotor/core/", "keyrotor.core"),
    ("/keyrotor/transports/_codec", "keyrotor's HTTP codecs (transports/_codec_*)"),
    ("/keyrotor/transports/", "keyrotor.transports (exchange steps, pool, driver)"),
    ("/keyrotor/adapters/proxy/server.py", "keyrotor proxy server"),
    ("/keyrotor/", "keyrotor proxy app and the rest of keyrotor"),
    ("/h11/", "h11"),
    ("/httptools/", "httptools"),
    ("/trio/", "trio"),
    ("/anyio/", "anyio"),
    ("/json/", "json"),
    ("contextlib.py", "contextlib (cancel scopes' context managers)"),
)


def _by_part(stats: pstats.Stats) -> dict[str, float]:
    """Own time summed by where the code lives; C calls count by their name."""
    shares: dict[str, float] = {}
    for func, (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        filename, _, name = func
        part = next((label for mark, label in _PARTS if mark in filename), None)
        if part is None:
            if "_socket.socket" in name or "select.epoll" in name:
                part = "system calls (socket send/recv, epoll)"
            else:
                part = "other (builtins, stdlib)"
        shares[part] = shares.get(part, 0.0) + own
    return shares


def signal_and_wait(proxy: Child, signum: int, said: str) -> None:
    """Send ``signum`` to the proxy and wait until its stderr has the line ``said``
    (a log's lines from before the signal are not read again)."""
    fd = proxy.log.fileno()
    start = os.fstat(fd).st_size
    os.kill(proxy.pid, signum)
    deadline = time.monotonic() + SIGNAL_TIMEOUT
    while time.monotonic() < deadline:
        if proxy.proc.poll() is not None:
            raise BenchError(f"the proxy exited:\n{proxy.log_tail()}")
        new = os.pread(fd, os.fstat(fd).st_size - start, start)
        if f"\n{said}\n".encode() in b"\n" + new:
            return
        time.sleep(0.02)
    raise BenchError(f"the proxy did not say {said!r} within {SIGNAL_TIMEOUT:g} s")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--stream", action="store_true", help="SSE instead of JSON")
    parser.add_argument("--state", action="store_true", help="keep a state file (as serve does)")
    parser.add_argument("--keys", type=int, default=0, help="a pool of N fake keys, not 4")
    parser.add_argument(
        "--route", action="store_true", help=f"requests name a route ({ROUTE!r}, proxy_load's)"
    )
    parser.add_argument(
        "--open", type=int, metavar="RPS", help="open loop at RPS requests/s (one client's pace)"
    )
    parser.add_argument(
        "--prompt-kb", type=int, default=0, metavar="N", help="N KB of earlier turns a request"
    )
    parser.add_argument(
        "--no-profile",
        action="store_true",
        help="no cProfile: only the proxy's user and system CPU a request (/proc)",
    )
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--save", metavar="PATH", help="keep the cProfile figures there")
    return parser


def main() -> int:
    args = _parser().parse_args()
    options = Options(
        rate=args.open or 200, duration=args.duration, concurrency=32, rounds=1,
        streaming=(args.stream,), warmup=1.0, prewarm=16, max_connections=256,
        prompt_kb=args.prompt_kb,
    )  # fmt: skip
    profiled = not args.no_profile
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        out = folder / "proxy.prof"
        _, upstream_url = start_upstream(stack)
        port = free_port()
        state = ["--state", str(folder / "state.db")] if args.state else ["--no-state"]
        runner = ["-c", RUN, str(out)] if profiled else ["-m", "keyrotor.cli"]
        cmd = [sys.executable, *runner, "serve", "--host", LOOPBACK,
               "--port", str(port), "--upstream", upstream_url, *state]  # fmt: skip
        env = _child_env({"OPENROUTER_KEYS": ",".join(FAKE_KEYS)})
        if args.keys or args.route:
            config = folder / "keyrotor.toml"
            config.write_text(
                (ROUTE_CONFIG if args.route else "")
                + (fake_keys_config(args.keys) if args.keys else "")
            )
            cmd += ["--config", str(config)]
            if args.keys:
                env = _child_env({})
        name = "keyrotor proxy" + (" (cProfile)" if profiled else "")
        with child(name, cmd, env, stdout=False) as proxy:
            if wait_ready(proxy, port, "/healthz") is None:
                raise BenchError(f"the proxy did not start:\n{proxy.log_tail()}")
            endpoint = Endpoint(LOOPBACK, port, "/v1/chat/completions")
            target = Target("proxy", endpoint, proxy.pid, ROUTE if args.route else MODEL)
            warm_up(target, options)
            if profiled:
                signal_and_wait(proxy, signal.SIGUSR1, "profile: on")
            user, system = cpu_times(proxy.pid)
            mode: Mode = "open" if args.open else "closed"
            result = measure(target, mode, args.stream, 1, options, {})
            after = cpu_times(proxy.pid)
            if profiled:
                signal_and_wait(proxy, signal.SIGUSR2, "profile: saved")
        per = 1e6 / max(result.ok, 1)
        body = "SSE" if args.stream else "JSON"
        loop = f"open loop at {args.open} rps" if args.open else "closed loop of 32"
        print(
            f"{body}, {loop} for {args.duration:g} s: {result.ok} ok, "
            f"{result.error_count} errors, {result.rps:.0f} rps"
            + (" under the profiler" if profiled else "")
            + f"; proxy CPU per request: user {(after[0] - user) * per:.0f} us, system "
            f"{(after[1] - system) * per:.0f} us"
            + (" (profiled)" if profiled else " (/proc/PID/stat over the window)")
        )
        if profiled:
            stats = pstats.Stats(str(out))
            if args.save:
                stats.dump_stats(args.save)
            _print_profile(stats, args.top)
    return 0


def _print_profile(stats: pstats.Stats, top: int) -> None:
    total = stats.total_tt  # type: ignore[attr-defined]
    print("\n| code | share of the proxy's own time |\n|---|---:|")
    for name, own in sorted(_by_part(stats).items(), key=lambda item: -item[1]):
        print(f"| {name} | {own / total * 100:.1f} % |")
    for key, title in (("tottime", "own time"), ("cumulative", "time in all")):
        print(f"\n| function ({title}) | calls | own s | all s | own % |")
        print("|---|---:|---:|---:|---:|")
        stats.sort_stats(key)
        for func in stats.fcn_list[:top]:  # type: ignore[attr-defined]
            calls, _, own, cumulative, _ = stats.stats[func]  # type: ignore[attr-defined]
            where = f"{Path(func[0]).name}:{func[1]} {func[2]}"
            print(f"| `{where}` | {calls} | {own:.2f} | {cumulative:.2f} | "
                  f"{own / total * 100:.1f} |")  # fmt: skip


if __name__ == "__main__":
    run_main(main)
