"""The `buffer-service` command: run the server and/or the worker, and operate the service.

    buffer-service serve              HTTP server and worker in one process
    buffer-service serve --no-worker  HTTP server only (scale webhooks apart from LLM work)
    buffer-service worker             worker only

Operations, on Redis directly (REDIS_URL; no running server needed), a table on the terminal or
JSON with --json (docs/operations.md):

    buffer-service stats [--hours N]                monitoring figures
    buffer-service buffers [CONVERSATION]           pending bursts, or one conversation's buffer
    buffer-service jobs [JOB] [--status STATUS]     job records (one job with its messages)
    buffer-service retry JOB | --all-failed         re-queue failed jobs
    buffer-service flags [set NAME VALUE]           feature flags
    buffer-service processing on|off                the processing switch
    buffer-service flush [CONVERSATION]             flush one conversation now, or sweep all due
    buffer-service cleanup [--purge-failed]         trim indexes and counters (run daily)
    buffer-service log webhooks|sweeps [--count N]  the webhook log or the sweep log
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from . import eventloop, logs, redis_client
from .config import ConfigError, Settings
from .flags import FlagError, Flags
from .ops import NotFound, Operations, OpsError
from .redis_client import REDIS_ERRORS
from .store import BufferStore

# Redis away or in a failover (redis_client.REDIS_ERRORS), or not reachable at all.
_UNREACHABLE: tuple[type[Exception], ...] = (*REDIS_ERRORS, OSError)


@dataclass(frozen=True)
class _Operation:
    """One operator command: its help, its arguments, what it asks of Operations, and how its
    answer reads on the terminal (without --json)."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], object]
    run: Callable[[Operations, argparse.Namespace], Awaitable[Any]]
    render: Callable[[argparse.Namespace, Any], str]


def _json_option() -> argparse.ArgumentParser:
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="buffer-service",
        description="Buffer bursts of Chatwoot WhatsApp messages in Redis; answer each burst once.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP server (and, by default, a worker)")
    serve.add_argument("--no-worker", action="store_true",
                       help="only take webhooks; run `buffer-service worker` elsewhere")
    sub.add_parser("worker", help="run a worker only: flush due buffers, ask the LLM, reply")
    out = _json_option()
    for name, operation in _OPERATIONS.items():
        operation.arguments(sub.add_parser(name, help=operation.help, description=operation.help,
                                           parents=[out]))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.command == "worker" or (args.command == "serve" and not args.no_worker):
            settings.require_worker()
        loop_factory = eventloop.factory(settings.event_loop)
    except ConfigError as exc:
        print(f"buffer-service: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command in _OPERATIONS:
        logs.configure("console", "warning")
        return asyncio.run(_operate(settings, args))
    logs.configure(settings.log_format, settings.log_level)

    from . import service

    http = args.command == "serve"
    worker = args.command == "worker" or not args.no_worker
    eventloop.settle_heap()
    try:
        eventloop.run(service.run(settings, http=http, worker=worker), loop_factory)
    except OSError as exc:  # e.g. the port is taken
        print(f"buffer-service: {exc}", file=sys.stderr)
        return 1
    return 0


# -- operations ------------------------------------------------------------------------------
def _unavailable(exc: Exception) -> int:
    print(f"buffer-service: Redis at REDIS_URL is unavailable: {exc}", file=sys.stderr)
    return 1


async def _operate(settings: Settings, args: argparse.Namespace) -> int:
    try:
        redis = await redis_client.connect(settings, attempts=1, fallback=False)
    except _UNREACHABLE as exc:
        return _unavailable(exc)
    store = BufferStore(redis, settings)
    ops = Operations(store, Flags(redis, settings))
    try:
        result = await _run(ops, args)
    except (OpsError, FlagError) as exc:
        print(f"buffer-service: {exc}", file=sys.stderr)
        return 1
    except _UNREACHABLE as exc:
        return _unavailable(exc)
    finally:
        await redis.aclose()
    if args.json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(_render(args, result))
    return 0


async def _run(ops: Operations, args: argparse.Namespace) -> Any:
    return await _OPERATIONS[args.command].run(ops, args)


# -- tables ----------------------------------------------------------------------------------
def _cell(value: Any, width: int = 60) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, str) and len(value) == 24 and value[10] == "T" and value.endswith("Z"):
        return value[:10] + " " + value[11:19]  # an ISO time: seconds are enough to read
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "-"
    text = str(value).replace("\n", " ")
    return text if len(text) <= width else text[:width - 3] + "..."


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], width: int = 60) -> str:
    if not rows:
        return "(none)\n"
    cells = [[_cell(row.get(key), width) for key, _ in columns] for row in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (_, title) in enumerate(columns)]
    lines = ["  ".join(title.ljust(w) for (_, title), w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _pairs(data: dict[str, Any], skip: Sequence[str] = ()) -> str:
    keys = [k for k in data if k not in skip]
    width = max((len(k) for k in keys), default=0)
    return "".join(f"{k.ljust(width)}  {_cell(data[k])}\n" for k in keys)


_JOB_COLUMNS = [("id", "JOB"), ("status", "STATUS"), ("conversation", "CONVERSATION"),
                ("inbox_id", "INBOX"), ("messages", "MSGS"), ("trigger", "TRIGGER"),
                ("attempts", "TRIES"), ("first_message_at", "FIRST MESSAGE"),
                ("deadline_at", "DEADLINE"), ("claimed_at", "CLAIMED"),
                ("processed_at", "PROCESSED"), ("reply_message_id", "REPLY"),
                ("error", "ERROR / REASON")]
_BUFFER_COLUMNS = [("conversation", "CONVERSATION"), ("status", "STATUS"), ("messages", "MSGS"),
                   ("first_message_at", "FIRST MESSAGE"), ("deadline_at", "DEADLINE"),
                   ("due_in_ms", "DUE IN MS"), ("batch_in_flight", "BATCH IN FLIGHT")]
_HOUR_COLUMNS = [("hour", "HOUR (UTC)"), ("bursts", "BURSTS"), ("messages", "MSGS"),
                 ("avg_messages_per_burst", "MSGS/BURST"), ("llm_calls_saved", "LLM SAVED"),
                 ("completed", "COMPLETED"),
                 ("avg_first_message_to_reply_s", "FIRST MSG->REPLY S"),
                 ("avg_deadline_to_claim_ms", "DEADLINE->CLAIM MS"), ("skipped", "SKIPPED"),
                 ("failed", "FAILED"), ("superseded", "SUPERSEDED"), ("by_trigger", "TRIGGERS"),
                 ("refused_messages", "REFUSED")]


_LOG_ORDER = ("outcome", "reason", "status", "conversation", "message", "buffered", "flush_in_ms",
              "worker", "sweeps", "claimed", "retaken", "late", "paused", "period_ms")


def _jobs(rows: list[dict[str, Any]]) -> str:
    return table([{**r, "error": r.get("error") or r.get("reason")} for r in rows], _JOB_COLUMNS)


def _messages(messages: list[dict[str, Any]]) -> str:
    return table([{"n": i + 1, "id": m.get("id"), "text": m.get("text")}
                  for i, m in enumerate(messages)], [("n", "#"), ("id", "MESSAGE"), ("text", "TEXT")])


def _render(args: argparse.Namespace, result: Any) -> str:
    return _OPERATIONS[args.command].render(args, result)


def _pairs_noted(result: dict[str, Any], text: str | None = None) -> str:
    """An action's answer, and a reminder when it waits for processing to be switched on."""
    text = _pairs(result) if text is None else text
    if result.get("processing") is False:
        text += "note: processing is off; nothing is answered until `buffer-service processing on`\n"
    return text


# -- commands: arguments, what each asks, how its answer reads -------------------------------
def _stats_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hours", type=int, default=24, help="hours to cover (24)")


async def _stats(ops: Operations, args: argparse.Namespace) -> Any:
    return await ops.stats(args.hours)


def _stats_text(args: argparse.Namespace, result: Any) -> str:
    active = "  ".join(f"{k}={v}" for k, v in result["active"].items())
    flags = "  ".join(f"{k}={v}" for k, v in result["flags"].items())
    totals = result["totals"]
    return (f"Active:  {active}\nFlags:   {flags}\n\n"
            f"Last {result['hours']} h, per hour:\n"
            + table(result["hourly"], _HOUR_COLUMNS)
            + f"\nTotal: {totals['bursts']} bursts, {totals['messages']} messages "
              f"({_cell(totals['avg_messages_per_burst'])} per burst), "
              f"{totals['completed']} completed (first message to reply "
              f"{_cell(totals['avg_first_message_to_reply_s'])} s on average), "
              f"deadline to claim {_cell(totals['avg_deadline_to_claim_ms'])} ms on average, "
              f"{totals['skipped']} skipped, {totals['failed']} failed, "
              f"{totals['superseded']} superseded\n"
            + "\nRecent failed jobs:\n" + _jobs(result["recent_failed_jobs"]))


def _buffers_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("conversation", nargs="?", help="ACCOUNT:CONVERSATION, e.g. 1:42")
    p.add_argument("--limit", type=int, default=100)


async def _buffers(ops: Operations, args: argparse.Namespace) -> Any:
    return await (ops.buffer(args.conversation) if args.conversation else ops.buffers(args.limit))


def _buffers_text(args: argparse.Namespace, result: Any) -> str:
    if not args.conversation:
        return table(result, _BUFFER_COLUMNS)
    text = _pairs(result, skip=("messages", "batch_in_flight"))
    batch = result["batch_in_flight"]
    if batch:
        text += f"batch_in_flight   {batch['id']} ({batch['status']}, {len(batch['burst'])} messages)\n"
    return text + "\nBuffered messages:\n" + _messages(result["messages"])


def _jobs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", help="a job id, e.g. 3-1234")
    p.add_argument("--status", choices=("buffering", "processing", "completed", "failed", "skipped"))
    p.add_argument("--limit", type=int, default=50)


async def _jobs_run(ops: Operations, args: argparse.Namespace) -> Any:
    if not args.job:
        return await ops.jobs(args.status, args.limit)
    job = await ops.job(args.job)
    if job is None:
        raise NotFound(f"no job {args.job}")
    return job


def _jobs_text(args: argparse.Namespace, result: Any) -> str:
    if args.job:
        return _pairs(result, skip=("burst",)) + "\nMessages kept with the job:\n" + _messages(
            result["burst"])
    if args.status == "buffering":  # pending bursts, as `buffers` lists them
        return table(result, _BUFFER_COLUMNS)
    return _jobs(result)


def _retry_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("job", nargs="?", help="the failed job's id")
    which.add_argument("--all-failed", action="store_true", help="every failed job")


async def _retry(ops: Operations, args: argparse.Namespace) -> Any:
    return await (ops.retry_all_failed() if args.all_failed else ops.retry(args.job))


def _retry_text(args: argparse.Namespace, result: Any) -> str:
    if not args.all_failed:
        return _pairs_noted(result)
    return _pairs_noted(
        result, f"re-queued {result['count']} failed job(s): {' '.join(result['retried']) or '-'}\n")


def _flags_arguments(p: argparse.ArgumentParser) -> None:
    flag_sub = p.add_subparsers(dest="flags_action")
    set_flag = flag_sub.add_parser("set", help="set a flag (every process sees it within a second)",
                                   parents=[_json_option()])
    set_flag.add_argument("name")
    set_flag.add_argument("value", help="on|off, a percentage, or a comma list of inbox ids")


async def _flags(ops: Operations, args: argparse.Namespace) -> Any:
    if args.flags_action == "set":
        return {"name": args.name, "value": await ops.flags.set(args.name, args.value)}
    return await ops.flags.table()


def _flags_text(args: argparse.Namespace, result: Any) -> str:
    if args.flags_action == "set":
        return _pairs_noted(result)
    rows = [{**f, "value": f["value"] or "(all)", "default": f["default"] or "(all)"} for f in result]
    return table(rows, [("name", "FLAG"), ("value", "VALUE"), ("default", "DEFAULT"),
                        ("description", "WHAT IT DOES")], width=200)


def _log_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=("webhooks", "sweeps"))
    p.add_argument("--count", type=int, default=50)


def _log_text(args: argparse.Namespace, result: Any) -> str:
    seen = {k for row in result for k in row} - {"id", "at"}
    keys = [k for k in _LOG_ORDER if k in seen] + sorted(seen - set(_LOG_ORDER))
    return table(result, [("at", "AT"), *((k, k.upper()) for k in keys)])


def _noted(args: argparse.Namespace, result: Any) -> str:
    return _pairs_noted(result)


_OPERATIONS: dict[str, _Operation] = {
    "stats": _Operation(
        "monitoring figures: active buffers by status, per-hour activity and timing, failed jobs",
        _stats_arguments, _stats, _stats_text),
    "buffers": _Operation("pending bursts with their deadlines, or one conversation's buffer",
                          _buffers_arguments, _buffers, _buffers_text),
    "jobs": _Operation("job records, newest first, or one job with its messages",
                       _jobs_arguments, _jobs_run, _jobs_text),
    "retry": _Operation("re-queue a failed job (or all of them); a worker answers it at once",
                        _retry_arguments, _retry, _retry_text),
    "flags": _Operation("list the feature flags, or `flags set NAME VALUE`",
                        _flags_arguments, _flags, _flags_text),
    "processing": _Operation(
        "switch processing on or off (off: buffer, claim nothing)",
        lambda p: p.add_argument("state", choices=("on", "off")),
        lambda ops, args: ops.set_processing(args.state == "on"), _noted),
    "flush": _Operation(
        "flush one conversation's burst now, or (without one) sweep every due buffer now",
        lambda p: p.add_argument("conversation", nargs="?", help="ACCOUNT:CONVERSATION"),
        lambda ops, args: ops.flush(args.conversation), _noted),
    "cleanup": _Operation(
        "trim job indexes and hourly counters to JOB_RETENTION_DAYS",
        lambda p: p.add_argument("--purge-failed", action="store_true",
                                 help="also delete every failed job for good"),
        lambda ops, args: ops.cleanup(purge_failed=args.purge_failed), _noted),
    "log": _Operation("recent webhook deliveries or worker sweeps, newest first",
                      _log_arguments, lambda ops, args: ops.log(args.kind, args.count), _log_text),
}


if __name__ == "__main__":
    sys.exit(main())
