"""Run every benchmark, one after the other, each in its own process, and summarise.

    python bench/run_all.py --quick     what `make bench` runs: small sizes, one run each
    python bench/run_all.py             the full sizes of BENCHMARKS.md, medians of 3 runs

Every script starts its own redis-server (repo redis.conf, a free port, a temporary
directory) and its own service processes; wrk must be installed (apt-get install wrk).
Results go to bench/results/<name>[-quick].json; the exit status is non-zero only when a
benchmark could not run, not when it missed a target (the summary says which).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SCRIPTS = ("ingest", "flush", "memory", "llm_calls", "scaling", "media", "cluster", "reply_latency")


def run(cmd: list[str]) -> int:
    """Run one benchmark; if we are stopped meanwhile, stop it with SIGTERM (not SIGKILL) so that
    it stops the redis-server and service processes it started."""
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default="", help=f"comma list out of {','.join(SCRIPTS)}")
    args = p.parse_args()
    chosen = args.only.split(",") if args.only else list(SCRIPTS)
    failed: list[str] = []
    summary: list[tuple[str, str, float]] = []
    for name in chosen:
        out = BENCH / "results" / f"{name}{'-quick' if args.quick else ''}.json"
        cmd = [sys.executable, str(BENCH / f"{name}.py"), "--json", str(out)]
        if args.quick:
            cmd.append("--quick")
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        started = time.monotonic()
        if run(cmd) != 0:
            failed.append(name)
            summary.append((name, "FAILED", time.monotonic() - started))
            continue
        met = json.loads(out.read_text())["results"].get("target_met")
        verdict = "target met" if met else "target NOT met" if met is not None else "measured"
        summary.append((name, verdict, time.monotonic() - started))
    print("\n=== summary")
    for name, verdict, seconds in summary:
        print(f"{name:10s} {verdict:15s} {seconds:6.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
