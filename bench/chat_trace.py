"""A synthetic but realistic WhatsApp trace: who writes what, when, in bursts.

How people write on WhatsApp support lines (the shape the buffer exists for): a customer sends
a burst of short messages a few seconds apart ("oi", "tudo bem?", "meu pedido não chegou"),
waits for an answer, and comes back minutes later with the next burst.

The generator, all from one seeded random.Random:
  * `conversations` conversations, each starting at a uniform time in the first `span_s` s;
  * each has 1-4 bursts (weights 40/30/20/10 %);
  * a burst has 1-8 messages, weights 30/22/15/10/8/6/5/4 % (mean 2.8): many single messages,
    a long tail of fragmented ones;
  * gaps inside a burst are uniform in 1-20 s; gaps between bursts uniform in 1-10 min.
Times are in real seconds; a replay divides them by a time scale (e.g. 100), and so must the
service's window (30 s real -> 300 ms). The window is longer than any gap inside a burst and
shorter than any gap between bursts, so the right answer is exactly one reply per burst.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

BURSTS_PER_CONVERSATION = ((1, 40), (2, 30), (3, 20), (4, 10))
MESSAGES_PER_BURST = ((1, 30), (2, 22), (3, 15), (4, 10), (5, 8), (6, 6), (7, 5), (8, 4))
INSIDE_GAP_S = (1.0, 20.0)
BETWEEN_GAP_S = (60.0, 600.0)


@dataclass(frozen=True)
class Message:
    at_s: float  # real seconds from the start of the trace
    conversation_id: int
    message_id: int
    burst: int  # index of the burst within its conversation
    text: str


def _pick(rng: random.Random, weighted: tuple[tuple[int, int], ...]) -> int:
    values, weights = zip(*weighted, strict=True)
    return rng.choices(values, weights)[0]


def generate(conversations: int, *, seed: int = 20261125, span_s: float = 600.0,
             first_conversation: int = 1,
             bursts_per_conversation: tuple[tuple[int, int], ...] = BURSTS_PER_CONVERSATION,
             between_gap_s: tuple[float, float] = BETWEEN_GAP_S) -> list[Message]:
    """The trace, sorted by time. Message ids are unique; texts name conversation, burst and
    position ("c12 b1 m3 ..."), so a reply built from a burst tells which messages it got.
    The keyword arguments let a test make a short trace of the same kind."""
    rng = random.Random(seed)
    out: list[Message] = []
    message_id = 1
    for c in range(first_conversation, first_conversation + conversations):
        t = rng.uniform(0, span_s)
        for b in range(_pick(rng, bursts_per_conversation)):
            if b:
                t += rng.uniform(*between_gap_s)
            for m in range(_pick(rng, MESSAGES_PER_BURST)):
                if m:
                    t += rng.uniform(*INSIDE_GAP_S)
                out.append(Message(t, c, message_id, b, f"c{c} b{b} m{m} queria saber do meu pedido"))
                message_id += 1
    out.sort(key=lambda m: m.at_s)
    return out


def bursts(trace: list[Message]) -> dict[tuple[int, int], list[str]]:
    """(conversation, burst) -> texts in order: what one reply should cover."""
    out: dict[tuple[int, int], list[str]] = {}
    for m in trace:
        out.setdefault((m.conversation_id, m.burst), []).append(m.text)
    return out


@dataclass
class Verdict:
    messages: int
    bursts: int
    llm_calls: int
    replies: int
    answered_once: int  # messages that appear in exactly one reply
    unanswered: int
    answered_twice: int
    whole_bursts: int  # replies that cover exactly one burst, all of it
    split_bursts: int  # bursts answered in more than one reply
    split_explained: int  # of those: the sender really paused longer than the window, or a
    #                       part of the burst went into a superseded reply (see `merged`)
    merged: int  # replies that mix bursts: by design when a burst came in while the reply to
    #              the previous one was being written (SUPERSEDE_STALE_REPLIES): at most
    #              `superseded` of them
    superseded: int

    @property
    def calls_per_message(self) -> float:
        return self.llm_calls / max(1, self.messages)


def check(trace: list[Message], replies: list[str], llm_calls: int,
          sent_at: dict[int, float], window_s: float, superseded: int = 0) -> Verdict:
    """Compare the replies ("Reply to: a | b | ...", LLMStandIn's default) with the trace.

    `sent_at` maps message id -> when the replay really sent it (scaled seconds): a burst split
    where the real gap exceeded the window is the window doing its job under a late sender,
    not the service flushing early."""
    by_text = {m.text: m for m in trace}
    count: dict[str, int] = {}
    reply_keys: list[set[tuple[int, int]]] = []
    whole = merged = 0
    expected = bursts(trace)
    for reply in replies:
        texts = reply.removeprefix("Reply to: ").split(" | ")
        keys = {(by_text[t].conversation_id, by_text[t].burst) for t in texts if t in by_text}
        for t in texts:
            count[t] = count.get(t, 0) + 1
        reply_keys.append(keys)
        if len(keys) > 1:
            merged += 1
        elif keys and texts == expected[next(iter(keys))]:
            whole += 1
    per_burst: dict[tuple[int, int], int] = {}
    for keys in reply_keys:
        for k in keys:
            per_burst[k] = per_burst.get(k, 0) + 1
    split = [k for k, n in per_burst.items() if n > 1]
    in_merged = {k for keys in reply_keys if len(keys) > 1 for k in keys}
    explained = 0
    for conv, burst in split:
        if (conv, burst) in in_merged:
            explained += 1
            continue
        ids = [m.message_id for m in trace if m.conversation_id == conv and m.burst == burst]
        gaps = [sent_at[b] - sent_at[a] for a, b in itertools.pairwise(ids) if a in sent_at and b in sent_at]
        if gaps and max(gaps) >= window_s:
            explained += 1
    return Verdict(
        messages=len(trace), bursts=len(expected), llm_calls=llm_calls, replies=len(replies),
        answered_once=sum(1 for m in trace if count.get(m.text) == 1),
        unanswered=sum(1 for m in trace if m.text not in count),
        answered_twice=sum(1 for m in trace if count.get(m.text, 0) > 1),
        whole_bursts=whole, split_bursts=len(split), split_explained=explained, merged=merged,
        superseded=superseded)
