"""Shared plumbing of the benchmarks: the service as a real process, wrk, percentiles, CPU time
of a process, and the result file every script writes.

Every benchmark starts its own redis-server (devtools.redis_server: the repo's redis.conf on a
free port in a temporary directory); none ever touches a Redis at 127.0.0.1:6379.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")

if str(ROOT) not in sys.path:  # `python bench/x.py`: devtools (and buffer_service without an install)
    sys.path.insert(1, str(ROOT))

from buffer_service import logs  # noqa: E402 - needs the path above
from devtools.processes import operator_env  # noqa: E402

# The service code that runs inside a benchmark process (worker, stores) logs only problems.
logs.configure("console", "warning")

# Stopped with SIGTERM (e.g. by run_all's caller): unwind, so that the redis-server and service
# processes a benchmark started are stopped by its `finally` blocks rather than orphaned.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


@contextlib.contextmanager
def workdir(name: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def service_env(redis_url: str, port: int, **extra: str | int) -> dict[str, str]:
    """The environment an operator sets for `buffer-service serve`."""
    return operator_env(**{"REDIS_URL": redis_url, "HOST": "127.0.0.1", "PORT": port, "LOG_LEVEL": "info",
                           "LOG_FORMAT": "json", **extra})


def checkout(ref: str, dest: Path) -> Path | None:
    """The service code as of git `ref` in `dest`, for before/after runs; None if unavailable."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "buffer_service"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    return dest


@contextlib.contextmanager
def profiled(pid: int, name: str, seconds: float) -> Iterator[None]:
    """py-spy (the `bench` extra: pip install -e '.[bench]') samples process `pid` for `seconds`
    while the block runs; the flame graph goes to bench/results/<name>-flame.svg."""
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if spy is None:
        raise SystemExit("py-spy is not installed (pip install -e '.[bench]')")
    out = RESULTS / f"{name}-flame.svg"
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "200", "--nonblocking",
                             "--duration", str(max(1, round(seconds))), "--format", "flamegraph",
                             "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.wait(60)
    print(f"flame graph of {name}: {out}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far, from /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- wrk -----------------------------------------------------------------------------------

@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    errors: int  # socket errors and non-2xx answers
    p50_ms: float
    p99_ms: float
    max_ms: float


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"cannot read wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(url: str, *, seconds: float, connections: int, env: dict[str, str],
        threads: int = 1) -> WrkResult:
    """wrk with bench/webhook.lua; `env` holds the script's WRK_* settings."""
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
           "--timeout", "5s", "-s", str(BENCH / "webhook.lua"), url]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=seconds + 60,
                         env=dict(os.environ, **env)).stdout
    done = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", out)
    if not done:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    requests = int(done.group(1))
    elapsed = _ms(done.group(2) + done.group(3)) / 1000
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    latency_line = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out)
    # No latency lines when no request completed (a warm-up against a slow start).
    p50, p99 = (_ms(lat[q]) if q in lat else float("nan") for q in ("50", "99"))
    return WrkResult(requests, elapsed, requests / elapsed, errors, p50, p99,
                     _ms(latency_line.group(1)) if latency_line else float("nan"))


# -- results ---------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True,
                                   text=True).stdout.strip()
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1),
            "python": platform.python_version(), "redis": redis_version,
            "kernel": platform.release()}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes and short runs (make bench)")
    p.add_argument("--repeat", type=int, default=0,
                   help="runs per measurement, medians reported (default 3, quick 1)")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    return p


def repeats(args: argparse.Namespace) -> int:
    return args.repeat or (1 if args.quick else 3)


def save(name: str, args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    record = {"benchmark": name, "quick": args.quick,
              "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "machine": machine(), "results": results}
    path = args.json or RESULTS / f"{name}{'-quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nresults written to {path}")
    return record


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table, printed by every script so its output pastes into BENCHMARKS.md."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
        return f"{v:,}" if isinstance(v, int) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
