"""The Lua scripts' headers against their bodies and their Python call sites (scripts.py, keys.py).

A KEYS or ARGV list that Python and Lua read in different orders misbinds silently at run time;
these checks make it an error before anything runs.
"""

from __future__ import annotations

import ast
import asyncio
import re
from dataclasses import replace
from importlib import resources
from pathlib import Path

import pytest

from buffer_service.chatwoot import ChatMessage, Decision, Handoff
from buffer_service.keys import Keys
from buffer_service.scripts import ScriptCallError, Scripts, Signature, sources_by_name
from buffer_service.store import BufferStore

SOURCES = sources_by_name()
PACKAGE = Path(str(resources.files("buffer_service")))
LIB = (PACKAGE / "lua" / "lib.lua").read_text(encoding="utf-8")


def _calls() -> dict[str, list[tuple[str, set[str], set[str]]]]:
    """Every `<...>.scripts.<name>(keys={...}, args={...})` in the package: (where, keys, args)."""
    found: dict[str, list[tuple[str, set[str], set[str]]]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Attribute)
                    and node.func.value.attr == "scripts"):
                continue
            named = {kw.arg: kw.value for kw in node.keywords}
            where = f"{path.name}:{node.lineno}"
            found.setdefault(node.func.attr, []).append(
                (where, _names(named.get("keys"), where), _names(named.get("args"), where)))
    return found


def _names(node: ast.expr | None, where: str) -> set[str]:
    """The literal names of a dict (and of dicts spread into it, such as optional keys)."""
    if not isinstance(node, ast.Dict):
        raise AssertionError(f"{where}: keys and args must be dict literals, so they can be checked")
    names = set()
    for key, value in zip(node.keys, node.values, strict=True):
        if key is None:  # **(... if ... else {}): every dict literal in it
            names |= {k.value for d in ast.walk(value) if isinstance(d, ast.Dict)
                      for k in d.keys if isinstance(k, ast.Constant)}
        else:
            assert isinstance(key, ast.Constant), f"{where}: a name that is not a literal"
            names.add(key.value)
    return names


CALLS = _calls()


def test_every_script_file_is_in_the_registry_and_has_a_header():
    assert set(SOURCES) == set(Scripts.__annotations__)
    for name, source in SOURCES.items():
        sig = Signature.parse(name, source)
        assert len(set(sig.keys)) == len(sig.keys) and len(set(sig.args)) == len(sig.args), name


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_header_declares_what_the_body_reads(name):
    """As many KEYS and ARGV as the script reads, no more: a name added or dropped on one side
    only shows up here."""
    sig = Signature.parse(name, SOURCES[name])
    body = "\n".join(line for line in SOURCES[name].splitlines() if not line.startswith("--"))
    used_keys = {int(i) for i in re.findall(r"KEYS\[(\d+)\]", body)}
    used_args = {int(i) for i in re.findall(r"ARGV\[(\d+)\]", body)}
    assert used_keys == set(range(1, len(sig.keys) + 1)), (name, sig.keys)
    assert used_args == set(range(1, len(sig.args) + 1)), (name, sig.args)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_python_call_sites_pass_the_declared_names(name):
    sig = Signature.parse(name, SOURCES[name])
    assert CALLS.get(name), f"no call site of {name}.lua goes through the registry"
    required = set(sig.keys) - sig.optional_keys
    for where, keys, args in CALLS[name]:
        assert required <= keys <= set(sig.keys), (where, sorted(keys ^ set(sig.keys)))
        assert args == set(sig.args), (where, sorted(args ^ set(sig.args)))


def test_a_call_that_does_not_match_the_header_fails_before_it_is_sent():
    sig = Signature.parse("renew", SOURCES["renew"])
    keys = {"batch": "b", "inflight": "i"}
    args = {"batch_id": "0-1", "token": "7", "lease_ms": 100}
    assert sig.bind("renew", keys, args) == (["b", "i"], ["0-1", "7", 100])
    with pytest.raises(ScriptCallError, match="missing"):
        sig.bind("renew", keys, {"batch_id": "0-1", "token": "7"})
    with pytest.raises(ScriptCallError, match="unknown"):
        sig.bind("renew", keys, {**args, "lease": 100})
    append = Signature.parse("append", SOURCES["append"])
    assert append.optional_keys == {"global_rate"} and append.keys[-1] == "global_rate"
    with pytest.raises(ScriptCallError, match="lacks"):
        Signature.parse("bare", "-- KEYS: a\nreturn 1\n")


def test_scripts_build_key_names_only_from_the_prefix_they_are_passed(settings):
    """A key a script finds while it runs is `<prefix argument> .. '<name>'` with a name that
    keys.py uses too: never cut out of another key (same hash tag, same slot)."""
    keys = Keys(settings)
    prefix = keys.prefix(0)
    samples = [keys.due(0), keys.first(0), keys.inflight(0), keys.active(0), keys.seq(0),
               keys.failed(0), keys.manual(0), keys.jobs(0, "completed"), keys.stats(0, 1),
               keys.buffer("1:2"), keys.ttl("1:2"), keys.history("1:2"), keys.handoff("1:2"),
               keys.pause("1:2"), keys.sent("1:2"), keys.batch("0-1"), keys.messages("0-1"),
               keys.done(0), keys.done_bucket(0, 1), keys.done_counts(0)]
    names = {s.removeprefix(keys.prefix(keys.shard_of("1:2"))).removeprefix(prefix).split(":")[0]
             for s in samples}
    for name, source in {**SOURCES, "lib": LIB}.items():
        body = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("--"))
        assert "string.sub(KEYS" not in body and "#KEYS" not in body, name
        allowed = {"P", "prefix"}
        if name != "lib":
            sig = Signature.parse(name, source)
            allowed.add(f"ARGV[{sig.args.index('prefix') + 1}]" if "prefix" in sig.args else "-")
            for var, index in re.findall(r"local (\w+) = ARGV\[(\d+)\]", body):
                if var == "P":
                    assert sig.args[int(index) - 1] == "prefix", name
        for base, word in re.findall(r"([\w\[\]]+) \.\. '(\w+):?'", body):
            if base in allowed:
                assert word in names, f"{name}.lua uses a key name keys.py does not know: {word}"
            else:
                assert word not in names, f"{name}.lua builds {word!r} from {base}, not the prefix"


async def test_every_way_of_calling_a_script_reloads_it_after_a_script_flush(redis, settings):
    """A restarted Redis has no scripts: the batched call (append), a pipelined one (note with
    its handoff) and a plain one (claim) each load theirs again and run once."""
    store = BufferStore(redis, replace(settings, buffer_duration_ms=1))
    assert (await store.append(ChatMessage(1, 901, 1, "hi"))).buffered
    await redis.script_flush()
    assert (await store.append(ChatMessage(1, 901, 2, "again"))).count == 2
    await redis.script_flush()
    agent = ChatMessage(1, 901, 3, "I take it", role="assistant")
    assert await store.note(Decision("note", message=agent, handoff=Handoff(1, 901, "assignee", 5.0),
                                     from_agent=True)) == "paused"
    await redis.script_flush()
    await asyncio.sleep(0.01)
    _, _, batches = await store.claim(store.keys.shard_of("1:901"), 10)
    assert [m["text"] for b in batches for m in b.messages] == ["hi", "again"]
    assert batches[0].takeover == "assignee"
