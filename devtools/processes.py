"""buffer-service as a real process, configured only by environment variables as an operator
configures it, and stopping the processes the tests, the benchmarks and the demo start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from buffer_service.config import DECLARED

ROOT = Path(__file__).resolve().parent.parent

# Service settings someone may have exported in this shell (every declared variable, and its
# _FILE variant): never inherited, so that a run is configured by what its caller passes and
# nothing else.
_SERVICE_SETTINGS = frozenset(name for d in DECLARED.values() for name in (d.env, f"{d.env}_FILE"))


def operator_env(**settings: str | int) -> dict[str, str]:
    """This process's environment without the service's settings, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if k not in _SERVICE_SETTINGS}
    env.update({k: str(v) for k, v in settings.items()})
    return env


def spawn_service(args: Sequence[str], env: dict[str, str], log: Path,
                  code_dir: Path = ROOT) -> subprocess.Popen[bytes]:
    """`buffer-service <args>` as its own process, its output appended to `log`; `code_dir` picks
    which checkout's code runs (the benchmarks compare this one with an older one)."""
    env = dict(env, PYTHONPATH=str(code_dir))
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "buffer_service.cli", *args], env=env,
                                cwd=code_dir, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10) -> None:
    """SIGTERM (a graceful shutdown), SIGKILL if that takes longer than `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
