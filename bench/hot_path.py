"""The webhook's hot path piece by piece: CPU microseconds per call of each step, before and after
the changes of issue 14, measured in one process in the same run (median of --repeat rounds).
These are the parts ingest.py cannot separate under wrk.

    python bench/hot_path.py [--quick] [--repeat N]
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from common import median, parser, repeats, save, table
from ingest import TEXT
from redis.asyncio.connection import Connection

from buffer_service import logs, metrics
from buffer_service.auth import signature_error
from buffer_service.chatwoot import classify
from buffer_service.config import Settings
from buffer_service.flags import FlagValues
from buffer_service.redis_client import standalone
from devtools.payloads import message_payload

Step = Callable[[], Any]


def per_call_us(step: Step, n: int) -> float:
    step()
    started = time.process_time()
    for _ in range(n):
        step()
    return (time.process_time() - started) / n * 1e6


def steps() -> list[tuple[str, Step, Step | None]]:
    """(what, after, before): `before` None when the step is unchanged (a reference)."""
    settings = Settings.from_env({})
    raw = orjson.dumps(message_payload(message_id=1, conversation_id=2, content=TEXT,
                                       created_at=datetime(2026, 11, 25, 12, 0, tzinfo=UTC)))
    payload = orjson.loads(raw)
    msg = classify(payload, settings, None).message
    assert msg is not None
    # A webhook's append call as store.append binds it (26 arguments) and its webhook log entry.
    evalsha = ("EVALSHA", "a" * 40, 8, *(f"bs:{{s1}}:{k}:1:2" for k in range(8)), "1:2", msg.to_json(),
               30000, 300000, 50, 86400000, "bs:wake", 1048576, "", 120, 60000, 0, 20, 604800000,
               "bs:{s1}:", 0)
    xadd = ("XADD", "bs:log:webhooks", "MAXLEN", "~", 10000, "*", "t", 1764450000000, "outcome",
            "buffered", "status", 200, "path", "/webhooks/chatwoot", "conversation", 2, "message", 1,
            "buffered", 1, "flush_in_ms", 30000)
    python_packing = Connection()
    hiredis_packing = standalone("redis://127.0.0.1:1").connection_pool.connection_class()
    proxy = structlog.get_logger("bench")
    bound = proxy.bind()
    flags_raw = {"buffering_percent": "100"}
    cached = FlagValues(flags_raw)
    secret, timestamp = "s3cret", str(int(time.time()))
    signature = "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + raw,
                                     hashlib.sha256).hexdigest()

    def line(logger: Any) -> Step:
        return lambda: logger.info("webhook", outcome="buffered", reason=None, conversation="1:2",
                                   message_id=1, ms=1.23)

    return [
        ("EVALSHA of a webhook packed (redis-py asyncio -> hiredis)",
         lambda: hiredis_packing.pack_commands([evalsha]), lambda: python_packing.pack_commands([evalsha])),
        ("webhook log XADD packed (redis-py asyncio -> hiredis)",
         lambda: hiredis_packing.pack_commands([xadd]), lambda: python_packing.pack_commands([xadd])),
        ("per-webhook log line (lazy proxy -> logger bound once)", line(bound), line(proxy)),
        ("webhook counter (labels() per call -> cached series)",
         lambda: metrics.webhook("buffered", "", 200),
         lambda: (metrics.WEBHOOKS.labels("buffered", "").inc(), metrics.MESSAGES_BUFFERED.inc())),
        ("flags: is this conversation buffered (values parsed per call -> once per reload; "
         "before includes building the values)",
         lambda: cached.buffers("1:2", 1), lambda: FlagValues(flags_raw).buffers("1:2", 1)),
        ("orjson.loads of the 2.5 KB body (reference)", lambda: orjson.loads(raw), None),
        ("classify the payload (reference)", lambda: classify(payload, settings, None), None),
        ("signature check, HMAC-SHA256 of the body (CHATWOOT_WEBHOOK_SECRET on)",
         lambda: signature_error(raw, timestamp, signature, secret, 300), None),
    ]


def main() -> dict[str, Any]:
    p = parser(__doc__.split("\n\n")[0])
    args = p.parse_args()
    # The log line's cost with the service's own renderer, written where it costs a write.
    logs.configure("json", "info")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=open("/dev/null", "w")))
    n = 2000 if args.quick else 20_000
    rounds = repeats(args)
    results: dict[str, dict[str, float]] = {}
    for what, after, before in steps():
        a = median([per_call_us(after, n) for _ in range(rounds)])
        b = median([per_call_us(before, n) for _ in range(rounds)]) if before else float("nan")
        results[what] = {"after_us": a, "before_us": b}
    rows = [[what, "" if r["before_us"] != r["before_us"] else f"{r['before_us']:.1f}",
             f"{r['after_us']:.1f}",
             "" if r["before_us"] != r["before_us"] else f"{r['after_us'] / r['before_us']:.2f}"]
            for what, r in results.items()]
    print(table(["step", "before us", "after us", "after / before"], rows))
    return save("hot_path", args, {"calls_per_round": n, "steps": results})


if __name__ == "__main__":
    main()
