"""Run the built image as docker-compose.yml declares `buffer-service`, and check it end to end.

Called by scripts/container-smoke.sh once the image is built and a redis-server runs. The
container gets the compose file's command, environment and health check, and .env.example as
its env file, exactly as `docker compose up` would give them; only what must differ on a host
network is replaced: the Redis address, Chatwoot's URL (the stand-in), the port, and the
secrets the stand-ins expect. So a compose file or .env.example the service cannot start with
fails here.

Checks: /readyz answers; a burst of signed webhooks for one conversation gives ONE LLM call
and ONE reply posted to the Chatwoot stand-in, holding every message of the burst; the compose
health check passes under `podman healthcheck run` and the image's own HEALTHCHECK passes too;
the process runs as uid 10001; SIGTERM ends it with exit code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import secrets
import shlex
import socket
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

from buffer_service.standins import ChatwootStandIn, LLMStandIn, message_payload, webhook_headers

SERVICE = "buffer-service"
WINDOW_MS = 1000
BURST = ["oi, bom dia", "meu pedido 5521 chegou quebrado", "a caixa estava amassada", "o que faço?"]
CONVERSATION = 4242
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def container_spec(compose: dict[str, Any], variables: Mapping[str, str]) -> dict[str, Any]:
    """The compose service's command, environment and health check, interpolated."""
    service = compose["services"][SERVICE]
    command = service.get("command", [])
    args = shlex.split(interpolate(command, variables)) if isinstance(command, str) else [
        interpolate(str(a), variables) for a in command]
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.partition("=")[::2] for item in environment)
    env = {k: interpolate(str(v), variables) for k, v in environment.items()}
    test = [interpolate(str(a), variables) for a in service["healthcheck"]["test"]]
    if test[0] != "CMD":
        raise SmokeFailure(f"{SERVICE}: expected a CMD health check, got {test[0]}")
    return {"args": args, "env": env, "healthcheck": test[1:], "env_file": service.get("env_file")}


async def wait_ready(url: str, podman: Podman, name: str, timeout: float) -> float:
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
        while time.monotonic() - started < timeout:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return time.monotonic() - started
            state = (await podman.run("inspect", "--format", "{{.State.Status}}", name))[1].strip()
            if state != "running":
                raise SmokeFailure(f"the container is {state} before /readyz answered")
            await asyncio.sleep(0.25)
    raise SmokeFailure(f"/readyz did not answer 200 within {timeout:.0f} s")


async def send_burst(service_url: str, secret: str) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for i, text in enumerate(BURST):
            raw = orjson.dumps(message_payload(message_id=880_000 + i, conversation_id=CONVERSATION,
                                               content=text))
            async with session.post(f"{service_url}/webhooks/chatwoot", data=raw,
                                    headers=webhook_headers(raw, secret)) as resp:
                body = await resp.json()
                if resp.status != 200 or body.get("status") != "buffered":
                    raise SmokeFailure(f"webhook {i}: HTTP {resp.status} {body}")
            await asyncio.sleep(0.1)


async def check_one_reply(chatwoot: ChatwootStandIn, llm: LLMStandIn) -> str:
    deadline = time.monotonic() + WINDOW_MS / 1000 + 30
    while not chatwoot.posts and time.monotonic() < deadline:  # noqa: ASYNC110 (the stand-in records posts in a list)
        await asyncio.sleep(0.1)
    # A second reply would come within moments of the first: wait a window past it.
    await asyncio.sleep(WINDOW_MS / 1000 + 1)
    await chatwoot.wait_echoes()
    if len(chatwoot.posts) != 1 or len(llm.calls) != 1:
        raise SmokeFailure(f"expected 1 LLM call and 1 reply, got {len(llm.calls)} calls and "
                           f"{len(chatwoot.posts)} replies: {[p.body for p in chatwoot.posts]}")
    post = chatwoot.posts[0]
    reply = post.body.get("content", "")
    if post.conversation_id != CONVERSATION or any(text not in reply for text in BURST):
        raise SmokeFailure(f"the reply does not answer the whole burst: conv {post.conversation_id}, "
                           f"{reply!r}")
    if [e.status for e in chatwoot.echoes] != [200]:
        raise SmokeFailure(f"the echo of the reply was not accepted: {chatwoot.echoes}")
    return reply


async def run(args: argparse.Namespace, compose: dict[str, Any], env_file: Path) -> None:
    podman = Podman(args.podman)
    redis_url = urlsplit(args.redis_url)
    variables = {**read_env_file(env_file), "BUFFER_REDIS_PASSWORD": redis_url.password or ""}
    spec = container_spec(compose, variables)
    if spec["env_file"] != ".env":
        raise SmokeFailure(f"{SERVICE}: expected env_file .env (from .env.example), got {spec['env_file']}")

    llm_key, chatwoot_token = secrets.token_hex(16), secrets.token_hex(16)
    webhook_secret = secrets.token_hex(24)
    port = _free_port()
    service_url = f"http://127.0.0.1:{port}"
    llm = LLMStandIn(api_key=llm_key)
    chatwoot = ChatwootStandIn(token=chatwoot_token, echo_webhook_url=f"{service_url}/webhooks/chatwoot",
                               echo_secret=webhook_secret)
    await llm.start()
    await chatwoot.start()
    # What must differ from the compose network on a host network; everything else is as declared.
    env = {
        **spec["env"],
        "REDIS_URL": _with_address(spec["env"]["REDIS_URL"], redis_url.hostname or "", redis_url.port or 0),
        "CHATWOOT_BASE_URL": chatwoot.base_url,
        "PORT": str(port),
        "OPENAI_BASE_URL": f"{llm.base_url}/v1",
        "OPENAI_API_KEY": llm_key,
        "CHATWOOT_API_TOKEN": chatwoot_token,
        "CHATWOOT_WEBHOOK_SECRET": webhook_secret,
        "MESSAGE_BUFFER_DURATION_MS": str(WINDOW_MS),
    }
    name = f"buffer-smoke-{secrets.token_hex(4)}"
    run_args = ["run", "--detach", "--name", name, "--network=host", "--env-file", str(env_file),
                # No systemd here to time health checks: they run on demand below.
                "--health-cmd", json.dumps(spec["healthcheck"]), "--health-interval", "disable"]
    for key, value in env.items():
        run_args += ["--env", f"{key}={value}"]
    t0 = time.monotonic()
    try:
        await podman.run(*run_args, args.image, *spec["args"])
        print(f"  container {name}: {' '.join(spec['args'])}, env from {env_file.name} + compose")
        ready_s = await wait_ready(f"{service_url}/readyz", podman, name, timeout=60)
        print(f"  /readyz 200 after {ready_s:.1f} s")
        await send_burst(service_url, webhook_secret)
        reply = await check_one_reply(chatwoot, llm)
        print(f"  {len(BURST)} webhooks -> 1 LLM call, 1 reply posted: {reply[:60]!r}...")

        code, out = await podman.run("healthcheck", "run", name, check=False)
        if code != 0:
            raise SmokeFailure(f"podman healthcheck run (compose's check) exited {code}: {out}")
        _, out = await podman.run("image", "inspect", "--format", "{{json .Config.Healthcheck.Test}}",
                                  args.image)
        image_check = json.loads(out)
        if not image_check or image_check[0] != "CMD":
            raise SmokeFailure(f"the image has no CMD HEALTHCHECK: {image_check}")
        await podman.run("exec", name, *image_check[1:])
        _, out = await podman.run("exec", name, "python3", "-c", "import os; print(os.getuid())")
        uid = out.strip()
        if uid != "10001":
            raise SmokeFailure(f"the service runs as uid {uid}, expected 10001")
        print("  podman healthcheck run: healthy (compose's /readyz); image HEALTHCHECK passes; uid 10001")

        await podman.run("kill", "--signal", "TERM", name)
        stop_started = time.monotonic()
        _, out = await podman.run("wait", name, timeout=60)
        if out.strip() != "0":
            raise SmokeFailure(f"SIGTERM: exit code {out.strip()}, expected 0")
        print(f"  SIGTERM: exit code 0 after {time.monotonic() - stop_started:.1f} s")
        print(f"  container phase took {time.monotonic() - t0:.1f} s")
    except BaseException:
        _, logs = await podman.run("logs", "--tail", "40", name, check=False)
        print(f"--- last lines of the container's log ---\n{logs}", file=sys.stderr)
        raise
    finally:
        await podman.run("rm", "--force", "--time", "0", name, check=False)
        await chatwoot.stop()
        await llm.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--podman", required=True, help="podman command (with its --root etc.)")
    parser.add_argument("--image", required=True)
    parser.add_argument("--compose", required=True)
    parser.add_argument("--env-file", required=True)
    parser.add_argument("--redis-url", required=True, help="the redis-server the container uses")
    args = parser.parse_args()
    compose = yaml.safe_load(Path(args.compose).read_text(encoding="utf-8"))
    try:
        asyncio.run(run(args, compose, Path(args.env_file)))
    except SmokeFailure as exc:
        sys.exit(f"container smoke test FAILED: {exc}")


if __name__ == "__main__":
    main()
