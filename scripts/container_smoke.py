"""Run the built image as docker-compose.yml declares its services, and check it end to end.

Called by scripts/container-smoke.sh once the image is built and a redis-server runs. Each
container gets its compose service's command, environment and health check, and .env.example
as its env file, as `docker compose up` would give them; only what must differ on a host
network is replaced: the Redis address, Chatwoot's URL (the stand-in), the ports, and the
secrets the stand-ins expect. So a compose file or .env.example the service cannot start with
fails here.

Two phases, as an operator runs them:
- `buffer-service` alone (serve: HTTP and a worker): /readyz answers; a burst of signed
  webhooks for one conversation gives ONE LLM call and ONE reply posted to the Chatwoot
  stand-in, holding every message of the burst, and Chatwoot's echo of it is accepted;
  `podman healthcheck run` passes (the compose check), so does the image's own HEALTHCHECK;
  the process runs as uid 10001 with no pip in its virtualenv; SIGTERM exits 0.
- the `workers` profile: serve --no-worker plus the `worker` replicas; the same burst check
  (the workers share the claims: still one reply), their health checks, SIGTERM exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson
import yaml
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

# The stand-ins run on this host, from the checkout: devtools is not installed (nor in the image).
if str(Path(__file__).resolve().parent.parent) not in sys.path:
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from devtools.chatwoot_standin import ChatwootStandIn
from devtools.llm_standin import LLMStandIn
from devtools.net import free_port, wait_http
from devtools.payloads import message_payload, webhook_headers

WINDOW_MS = 1000
BURST = ["oi, bom dia", "meu pedido 5521 chegou quebrado", "a caixa estava amassada", "o que faço?"]
# Compose's ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error} and $$.
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


class SmokeFailure(Exception):
    """A check failed; the message says which and what was seen."""


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Substitute variables the way Compose does for the forms docker-compose.yml uses."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        value = variables.get(name)
        missing = value is None or (value == "" and op is not None and op.startswith(":"))
        if op and op.endswith("?") and missing:
            raise SmokeFailure(f"docker-compose.yml: {name} is required: {arg}")
        if op and op.endswith("-") and missing:
            return arg
        return value or ""

    return _VARIABLE.sub(replace, text)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as `env_file:` and `podman --env-file` read them (no quotes, no inline comments)."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise SmokeFailure(f"{path.name}:{number}: not a KEY=VALUE line: {line!r}")
        values[name] = value
    return values


def _with_address(url: str, host: str, port: int) -> str:
    """`url` pointed at host:port, keeping its scheme, credentials, path."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@{host}:{port}" if credentials else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


class Podman:
    def __init__(self, command: str) -> None:
        self.command = shlex.split(command)

    async def run(self, *args: str, timeout: float = 60, check: bool = True) -> tuple[int, str]:
        """(exit code, stdout + stderr); the stand-ins keep serving while podman runs."""
        proc = await asyncio.create_subprocess_exec(*self.command, *args, stdout=subprocess.PIPE,
                                                    stderr=subprocess.STDOUT)
        try:
            async with asyncio.timeout(timeout):
                out, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise SmokeFailure(f"podman {' '.join(args[:2])} did not finish within {timeout:.0f} s") from None
        text = out.decode(errors="replace")
        if check and proc.returncode != 0:
            raise SmokeFailure(f"podman {' '.join(args[:2])} exited {proc.returncode}: {text.strip()[-800:]}")
        return proc.returncode or 0, text


def container_spec(compose: dict[str, Any], service_name: str,
                   variables: Mapping[str, str]) -> dict[str, Any]:
    """A compose service's command, environment, health check and replicas, interpolated."""
    service = compose["services"][service_name]
    if service.get("env_file") != ".env":
        raise SmokeFailure(f"{service_name}: expected env_file .env (from .env.example), "
                           f"got {service.get('env_file')}")
    command = service.get("command", [])
    args = shlex.split(interpolate(command, variables)) if isinstance(command, str) else [
        interpolate(str(a), variables) for a in command]
    environment = service.get("environment", {})
    env = {k: interpolate(str(v), variables) for k, v in environment.items()}
    test = [interpolate(str(a), variables) for a in service["healthcheck"]["test"]]
    if test[0] != "CMD":
        raise SmokeFailure(f"{service_name}: expected a CMD health check, got {test[0]}")
    replicas = int(interpolate(str(service.get("deploy", {}).get("replicas", 1)), variables))
    return {"args": args, "env": env, "healthcheck": test[1:], "replicas": replicas}


class Run:
    """One smoke run: the stand-ins, the containers it started, and the checks."""

    def __init__(self, args: argparse.Namespace, compose: dict[str, Any], env_file: Path) -> None:
        self.podman = Podman(args.podman)
        self.image = args.image
        self.compose = compose
        self.env_file = env_file
        self.redis_dir = Path(args.redis_dir)
        self.redis_port = free_port()
        self.variables = {**read_env_file(env_file), "BUFFER_REDIS_PASSWORD": secrets.token_hex(16)}
        self.llm_key, self.chatwoot_token = secrets.token_hex(16), secrets.token_hex(16)
        self.webhook_secret = secrets.token_hex(24)
        self.llm = LLMStandIn(api_key=self.llm_key)
        self.chatwoot = ChatwootStandIn(token=self.chatwoot_token, echo_secret=self.webhook_secret)
        self.containers: list[str] = []
        self.redis: asyncio.subprocess.Process | None = None

    async def start_redis(self, compose_dir: Path) -> None:
        """redis-server with the command `buffer-redis` declares, its volumes mapped to this host
        (the repo's redis.conf, a data folder), on a free loopback port; the password must hold."""
        service = self.compose["services"]["buffer-redis"]
        host_paths = {}
        for volume in service["volumes"]:
            source, target = volume.split(":")[:2]
            host_paths[target] = str(compose_dir / source) if source.startswith(".") else str(self.redis_dir)
        declared = [interpolate(str(a), self.variables) for a in service["command"]]
        args = [host_paths.get(a, a) for a in declared]
        self.redis = await asyncio.create_subprocess_exec(
            *args, "--bind", "127.0.0.1", "--port", str(self.redis_port),
            "--logfile", str(self.redis_dir / "redis.log"), stdout=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{self.redis_port}/0"
        password = self.variables["BUFFER_REDIS_PASSWORD"]
        for _ in range(100):
            with contextlib.suppress(RedisConnectionError):
                async with Redis.from_url(url, password=password) as redis:
                    await redis.ping()
                break
            await asyncio.sleep(0.1)
        else:
            raise SmokeFailure(f"redis-server ({' '.join(args[:2])} ...) did not answer")
        async with Redis.from_url(url) as redis:
            with contextlib.suppress(AuthenticationError, ResponseError):
                await redis.ping()
                raise SmokeFailure("buffer-redis answers without its password")
        print(f"  redis-server as buffer-redis: {' '.join(args[1:2])}, requirepass, port {self.redis_port}")

    async def stop_redis(self) -> None:
        if self.redis is not None and self.redis.returncode is None:
            self.redis.terminate()
            await self.redis.wait()

    async def start(self, service_name: str, variables: Mapping[str, str], **overrides: str) -> str:
        """Run one container of a compose service: its command, environment and health check,
        .env.example as env file, and `overrides` for what differs on a host network."""
        spec = container_spec(self.compose, service_name, variables)
        env = {
            **spec["env"],
            "REDIS_URL": _with_address(spec["env"]["REDIS_URL"], "127.0.0.1", self.redis_port),
            "CHATWOOT_BASE_URL": self.chatwoot.base_url,
            "OPENAI_BASE_URL": f"{self.llm.base_url}/v1",
            "OPENAI_API_KEY": self.llm_key,
            "CHATWOOT_API_TOKEN": self.chatwoot_token,
            "CHATWOOT_WEBHOOK_SECRET": self.webhook_secret,
            "MESSAGE_BUFFER_DURATION_MS": str(WINDOW_MS),
            **overrides,
        }
        name = f"buffer-smoke-{service_name}-{secrets.token_hex(3)}"
        run_args = ["run", "--detach", "--name", name, "--network=host", "--env-file", str(self.env_file),
                    # No systemd here to time health checks: they run on demand (`healthy`).
                    "--health-cmd", json.dumps(spec["healthcheck"]), "--health-interval", "disable"]
        for key, value in env.items():
            run_args += ["--env", f"{key}={value}"]
        self.containers.append(name)
        await self.podman.run(*run_args, self.image, *spec["args"])
        print(f"  {name}: {' '.join(spec['args'])} (env: {self.env_file.name}, compose, host overrides)")
        return name

    async def wait_http(self, url: str, name: str, timeout: float = 60) -> float:
        async def running() -> None:
            _, state = await self.podman.run("inspect", "--format", "{{.State.Status}}", name)
            if state.strip() != "running":
                raise SmokeFailure(f"{name} is {state.strip()} before {url} answered")

        try:
            return await wait_http(url, timeout=timeout, interval=0.25, alive=running)
        except TimeoutError as exc:
            raise SmokeFailure(str(exc)) from None

    async def burst_gets_one_reply(self, service_url: str, conversation: int) -> str:
        """Four signed webhooks for one conversation: one LLM call, one reply holding all four."""
        self.llm.reset()
        self.chatwoot.reset()
        self.chatwoot.echo_webhook_url = f"{service_url}/webhooks/chatwoot"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            for i, text in enumerate(BURST):
                raw = orjson.dumps(message_payload(message_id=conversation * 100 + i,
                                                   conversation_id=conversation, content=text))
                async with session.post(f"{service_url}/webhooks/chatwoot", data=raw,
                                        headers=webhook_headers(raw, self.webhook_secret)) as resp:
                    body = await resp.json()
                    if resp.status != 200 or body.get("status") != "buffered":
                        raise SmokeFailure(f"webhook {i}: HTTP {resp.status} {body}")
                await asyncio.sleep(0.1)
        deadline = time.monotonic() + WINDOW_MS / 1000 + 30
        while not self.chatwoot.posts and time.monotonic() < deadline:  # noqa: ASYNC110 (a list)
            await asyncio.sleep(0.1)
        # A second reply would come within moments of the first: wait a window past it.
        await asyncio.sleep(WINDOW_MS / 1000 + 1)
        await self.chatwoot.wait_echoes()
        posts, calls = self.chatwoot.posts, self.llm.calls
        if len(posts) != 1 or len(calls) != 1:
            raise SmokeFailure(f"expected 1 LLM call and 1 reply, got {len(calls)} calls and "
                               f"{len(posts)} replies: {[p.body for p in posts]}")
        reply = posts[0].body.get("content", "")
        if posts[0].conversation_id != conversation or any(text not in reply for text in BURST):
            raise SmokeFailure(f"the reply does not answer the whole burst: conv {posts[0].conversation_id}, "
                               f"{reply!r}")
        if [e.status for e in self.chatwoot.echoes] != [200]:
            raise SmokeFailure(f"the echo of the reply was not accepted: {self.chatwoot.echoes}")
        print(f"  {len(BURST)} webhooks -> 1 LLM call, 1 reply posted: {reply[:50]!r}...")
        return reply

    async def healthy(self, name: str) -> None:
        code, out = await self.podman.run("healthcheck", "run", name, check=False)
        if code != 0:
            raise SmokeFailure(f"podman healthcheck run {name} (the compose file's check): {code} {out}")

    async def image_facts(self, name: str) -> None:
        """The image's own HEALTHCHECK passes, the service runs as 10001, and the virtualenv has no pip."""
        _, out = await self.podman.run("image", "inspect", "--format", "{{json .Config.Healthcheck.Test}}",
                                       self.image)
        image_check = json.loads(out)
        if not image_check or image_check[0] != "CMD":
            raise SmokeFailure(f"the image has no CMD HEALTHCHECK: {image_check}")
        await self.podman.run("exec", name, *image_check[1:])
        probe = "import os, importlib.util as u; print(os.getuid(), u.find_spec('pip'))"
        _, out = await self.podman.run("exec", name, "python3", "-c", probe)
        if out.split() != ["10001", "None"]:
            raise SmokeFailure(f"expected uid 10001 and no pip in the virtualenv, got {out.strip()!r}")

    async def sigterm_exits_0(self, *names: str) -> None:
        started = time.monotonic()
        for name in names:
            await self.podman.run("kill", "--signal", "TERM", name)
        for name in names:
            _, out = await self.podman.run("wait", name, timeout=60)
            if out.strip() != "0":
                raise SmokeFailure(f"SIGTERM: {name} exited {out.strip()}, expected 0")
        print(f"  SIGTERM: {len(names)} container(s) exited 0 within {time.monotonic() - started:.1f} s")

    async def remove_containers(self, show_logs: bool) -> None:
        for name in self.containers:
            if show_logs:
                _, logs = await self.podman.run("logs", "--tail", "30", name, check=False)
                print(f"--- last lines of {name}'s log ---\n{logs}", file=sys.stderr)
            await self.podman.run("rm", "--force", "--time", "0", name, check=False)
        self.containers.clear()


async def serve_alone(run: Run) -> None:
    """`docker compose up -d`: serve, HTTP server and worker in one process."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    name = await run.start("buffer-service", run.variables, PORT=str(port))
    print(f"  /readyz 200 after {await run.wait_http(f'{url}/readyz', name):.1f} s")
    await run.burst_gets_one_reply(url, conversation=4242)
    await run.healthy(name)
    await run.image_facts(name)
    print("  podman healthcheck run: healthy; image HEALTHCHECK passes; uid 10001; no pip")
    await run.sigterm_exits_0(name)


async def workers_profile(run: Run) -> None:
    """`docker compose --profile workers up -d`, BUFFER_SERVE_OPTIONS=--no-worker.

    The web container only takes webhooks, the `worker` replicas answer; still one reply per burst.
    """
    variables = {**run.variables, "BUFFER_SERVE_OPTIONS": "--no-worker"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    web = await run.start("buffer-service", variables, PORT=str(port))
    replicas = container_spec(run.compose, "worker", variables)["replicas"]
    workers = []
    for _ in range(replicas):
        metrics_port = free_port()
        name = await run.start("worker", variables, METRICS_PORT=str(metrics_port))
        workers.append((name, metrics_port))
    await run.wait_http(f"{url}/readyz", web)
    for name, metrics_port in workers:
        await run.wait_http(f"http://127.0.0.1:{metrics_port}/metrics", name)
    await run.burst_gets_one_reply(url, conversation=4343)
    for name, _ in workers:
        await run.healthy(name)
    print(f"  {replicas} workers: podman healthcheck run: healthy (their /metrics)")
    await run.sigterm_exits_0(web, *(name for name, _ in workers))


async def main_async(args: argparse.Namespace, compose: dict[str, Any], compose_dir: Path,
                     env_file: Path) -> None:
    run = Run(args, compose, env_file)
    failed = True
    try:
        await run.start_redis(compose_dir)
        await run.llm.start()
        await run.chatwoot.start()
        for phase in (serve_alone, workers_profile):
            started = time.monotonic()
            print(f"  -- {phase.__doc__.splitlines()[0] if phase.__doc__ else phase.__name__}")
            await phase(run)
            await run.remove_containers(show_logs=False)
            print(f"  ({time.monotonic() - started:.1f} s)")
        failed = False
    finally:
        await run.remove_containers(show_logs=failed)
        await run.chatwoot.stop()
        await run.llm.stop()
        await run.stop_redis()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--podman", required=True, help="podman command (with its --root etc.)")
    parser.add_argument("--image", required=True)
    parser.add_argument("--compose", required=True)
    parser.add_argument("--env-file", required=True)
    parser.add_argument("--redis-dir", required=True, help="data folder of the redis-server started here")
    args = parser.parse_args()
    compose_path = Path(args.compose).resolve()
    compose = yaml.safe_load(compose_path.read_text(encoding="utf-8"))
    try:
        asyncio.run(main_async(args, compose, compose_path.parent, Path(args.env_file)))
    except SmokeFailure as exc:
        sys.exit(f"container smoke test FAILED: {exc}")


if __name__ == "__main__":
    main()
