"""The Lua scripts of the service, each loaded once, called with named keys and arguments.

Every script in lua/ (but lib.lua, the helpers prepended to each) starts with a header that names
its KEYS and ARGV in order:

    -- KEYS: batch inflight
    -- ARGV: batch_id token lease_ms

A name in brackets is optional and may only end the list (the script must cope with it missing).
Either list may go on over lines that hold nothing but names, indented past the tag. Callers
pass dicts keyed by those names (`await scripts.renew(keys={...}, args={...})`); a missing or
unknown name is a ScriptCallError before anything is sent, so the Python side and the Lua side
cannot drift apart by position. tests/test_scripts.py checks every call site against the headers.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError
from redis.typing import EncodableT, KeyT

from .batcher import ScriptBatcher
from .redis_client import AnyRedis

_TAG = re.compile(r"^-- (KEYS|ARGV):(.*)$")
_MORE = re.compile(r"^--\s{4,}([\w\[\] ]+)$")
_NAME = re.compile(r"^\[?(\w+)\]?$")
# Concurrent webhooks share one round trip for their appends (batcher.py), and on a cluster for
# their checks of the global rate limit.
_BATCHED = frozenset({"append", "globalrate"})
# The writes REDIS_WAIT_REPLICAS holds until replicas have them: a webhook's append (before it
# is acknowledged) and the step before a reply's post (before it leaves: a failover that lost it
# would let the reply be posted twice). They go through the batcher, which sends the WAIT.
_DURABLE = frozenset({"append", "before_post"})


class ScriptCallError(TypeError):
    """A script's header is malformed, or a call names what it does not declare or omits what
    it needs."""


@dataclass(frozen=True)
class Signature:
    keys: tuple[str, ...]
    args: tuple[str, ...]
    optional_keys: frozenset[str] = frozenset()
    _all_keys: frozenset[str] = field(init=False, repr=False, compare=False)
    _required_keys: frozenset[str] = field(init=False, repr=False, compare=False)
    _arg_names: frozenset[str] = field(init=False, repr=False, compare=False)

    @classmethod
    def parse(cls, name: str, source: str) -> Signature:
        found: dict[str, list[str]] = {}
        current: list[str] | None = None
        for line in source.splitlines():
            tag, more = _TAG.match(line), _MORE.match(line)
            if tag:
                if tag[1] in found:
                    raise ScriptCallError(f"{name}.lua declares {tag[1]} twice")
                current = found[tag[1]] = tag[2].split()
            elif more and current is not None:
                current.extend(more[1].split())
            else:
                current = None
        if set(found) != {"KEYS", "ARGV"}:
            raise ScriptCallError(f"{name}.lua lacks a '-- KEYS:' or '-- ARGV:' header line")
        keys, optional = [], set()
        for word in found["KEYS"]:
            m = _NAME.match(word)
            if not m:
                raise ScriptCallError(f"{name}.lua: bad key name {word!r}")
            if word.startswith("["):
                optional.add(m[1])
            elif optional:
                raise ScriptCallError(f"{name}.lua: required key {word!r} after an optional one")
            keys.append(m[1])
        if not all(re.fullmatch(r"\w+", a) for a in found["ARGV"]):
            raise ScriptCallError(f"{name}.lua: ARGV names must be plain words")
        return cls(tuple(keys), tuple(found["ARGV"]), frozenset(optional))

    def __post_init__(self) -> None:
        # The names a well-formed call passes, compared as sets in one step (bind's usual case).
        object.__setattr__(self, "_all_keys", frozenset(self.keys))
        object.__setattr__(self, "_required_keys", frozenset(self.keys) - self.optional_keys)
        object.__setattr__(self, "_arg_names", frozenset(self.args))

    def bind(self, name: str, keys: Mapping[str, KeyT],
             args: Mapping[str, EncodableT]) -> tuple[list[KeyT], list[EncodableT]]:
        """The positional KEYS and ARGV for a call by name; ScriptCallError on any mismatch."""
        given = keys.keys()
        if args.keys() == self._arg_names:
            # Every webhook's append comes here: no name missing or unknown, so no lists of them.
            if given == self._all_keys:
                return [keys[k] for k in self.keys], [args[a] for a in self.args]
            if given == self._required_keys:
                return [keys[k] for k in self.keys if k in given], [args[a] for a in self.args]
        missing = [k for k in self.keys if k not in keys and k not in self.optional_keys]
        missing += [a for a in self.args if a not in args]
        unknown = [k for k in keys if k not in self.keys] + [a for a in args if a not in self.args]
        if missing or unknown:
            raise ScriptCallError(f"{name}.lua: missing {missing}, unknown {unknown}")
        bound = []
        for k in self.keys:
            if k not in keys:
                break  # optional keys only end the list
            bound.append(keys[k])
        return bound, [args[a] for a in self.args]


class Script:
    def __init__(self, redis: AnyRedis, name: str, source: str, lib: str, *,
                 batched: bool = False, replicas: int = 0) -> None:
        self.name = name
        self.signature = Signature.parse(name, source)
        # lib.lua holds only local helpers; every script may use them. A script that builds key
        # names from its shard's prefix first makes sure its slot is not being moved (lib.lua).
        if "prefix" in self.signature.args:
            lib += f"whole_slot(ARGV[{self.signature.args.index('prefix') + 1}])\n"
        self._redis = redis
        self._script: AsyncScript = redis.register_script(lib + source)
        self._batcher = (ScriptBatcher(redis, self._script, replicas=replicas)
                         if batched or replicas else None)

    async def __call__(self, *, keys: Mapping[str, KeyT], args: Mapping[str, EncodableT],
                       client: Pipeline | ClusterPipeline | None = None,
                       deadline: float | None = None) -> Any:
        """Run the script; with `client`, queue it in that pipeline instead. `deadline` (event-loop
        time), for a batched script only: TimeoutError past it, from the timer of the round trip
        the call shares (batcher.py)."""
        bound_keys, bound_args = self.signature.bind(self.name, keys, args)
        if self._batcher is not None and client is None:
            return await self._batcher(bound_keys, bound_args, deadline)
        if deadline is not None:
            raise ScriptCallError(f"{self.name}.lua: a deadline needs a batched call")
        if isinstance(client, ClusterPipeline):
            # A cluster pipeline neither loads scripts nor takes EVALSHA by name; EVAL sends the
            # text, so a node that never saw the script (a promoted replica) runs it too.
            return client.execute_command("EVAL", self._script.script, len(bound_keys),
                                          *bound_keys, *bound_args)
        if client is not None:
            return await self._script(keys=bound_keys, args=bound_args, client=client)
        try:
            return await self._redis.evalsha(self._script.sha, len(bound_keys), *bound_keys,
                                             *bound_args)
        except NoScriptError:
            # Not redis-py's Script, which answers NOSCRIPT with a SCRIPT LOAD that a cluster
            # client sends to every primary: one that hangs would hold this call up for 20 s
            # though its keys are elsewhere. EVAL goes to the keys' node alone, which keeps the
            # script for the next EVALSHA.
            return await self._redis.execute_command("EVAL", self._script.script, len(bound_keys),
                                                     *bound_keys, *bound_args)


class Scripts:
    """One registry per Redis client: every script of lua/, by its file name."""

    append: Script
    before_post: Script
    claim: Script
    fail: Script
    finish: Script
    flush: Script
    globalrate: Script
    handoff: Script
    llmquota: Script
    mark: Script
    mediaclaim: Script
    medianote: Script
    note: Script
    noted: Script
    part: Script
    purge: Script
    release: Script
    renew: Script
    requeue: Script
    trimdone: Script
    weblog: Script

    def __init__(self, redis: AnyRedis, wait_replicas: int = 0) -> None:
        sources = sources_by_name()
        declared = set(Scripts.__annotations__)
        if set(sources) != declared:
            raise ScriptCallError(f"lua/ and Scripts disagree: files {sorted(set(sources) - declared)} "
                                  f"not declared, declared {sorted(declared - set(sources))} missing")
        lib = _lib()
        for name, source in sources.items():
            setattr(self, name, Script(redis, name, source, lib, batched=name in _BATCHED,
                                       replicas=wait_replicas if name in _DURABLE else 0))


def _lua() -> Traversable:
    return resources.files(__package__).joinpath("lua")


@functools.cache
def _lib() -> str:
    return _lua().joinpath("lib.lua").read_text(encoding="utf-8")


@functools.cache
def sources_by_name() -> dict[str, str]:
    """Every script's own text (without lib.lua), by name."""
    return {path.name.removesuffix(".lua"): path.read_text(encoding="utf-8")
            for path in sorted(_lua().iterdir(), key=lambda p: p.name)
            if path.name.endswith(".lua") and path.name != "lib.lua"}
