"""`make demo` end to end (devtools/demo.py): its timeline shows the typing indicator around the
LLM call, every message the Chatwoot stand-in recorded (the parts of a split reply with their
pauses), the keyword handoff without the LLM and the model's handoff, and a true summary."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools import demo


async def test_the_demo_shows_typing_the_posts_and_the_handoffs(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]):
    # A customer writes at most 0.5 s apart: one burst each, with a second to spare under load.
    run = await demo.run(window_ms=1500, gap_s=0.25, workdir=tmp_path)
    assert demo.report(run) == 0
    out = capsys.readouterr().out
    events = sorted(run.timeline.events)
    assert "\n".join(run.timeline.lines()) in out

    def at(who: str, fragment: str) -> list[int]:
        """Where in the timeline `who` reported something that contains `fragment`."""
        return [i for i, (_, by, what) in enumerate(events) if by == who and fragment in what]

    # Every message the stand-in recorded is in the timeline, in its conversation.
    public = [p for p in run.chatwoot.posts if not p.body.get("private")]
    for post in run.chatwoot.posts:
        assert at("chatwoot", f"conv {post.conversation_id}: "), post
        assert at("chatwoot", post.body["content"].splitlines()[0]), post
    # João's reply: as many messages as Chatwoot got (3 once split, 1 without), each further one
    # with its pause; typing on before the first and off after the last, on WhatsApp too.
    joao = demo.JOAO.conversation
    posted = at("chatwoot", f"conv {joao}: message posted")
    assert len(posted) == len(run.chatwoot.posts_for(joao)) >= 1
    assert all("after a pause of" in events[i][2] for i in posted[1:])
    assert at("chatwoot", f"conv {joao}: typing on")[0] < posted[0] <= posted[-1] \
        < at("chatwoot", f"conv {joao}: typing off")[-1]
    assert at("whatsapp", f"conv {joao}: presence composing")[0] < posted[0] \
        and at("whatsapp", f"conv {joao}: presence paused")
    assert at("llm", f"conv {joao}: 1 call")
    # Ana asked for a person: the handoff message, the note, `open`; no LLM call, no typing.
    ana = demo.ANA.conversation
    assert at("chatwoot", f"conv {ana}: message posted: {demo.HANDOFF_MESSAGE!r}")
    assert at("chatwoot", f"conv {ana}: private note for the agents")
    assert at("chatwoot", f"conv {ana}: status set to open")
    assert not at("llm", f"conv {ana}:") and not at("chatwoot", f"conv {ana}: typing")
    # Pedro: the model's tool call hands him over.
    pedro = demo.PEDRO.conversation
    (call,) = at("llm", f"conv {pedro}: 1 call")
    assert "handoff_to_human call" in events[call][2]
    assert call < at("chatwoot", f"conv {pedro}: private note")[0] \
        < at("chatwoot", f"conv {pedro}: status set to open")[0]
    # The summary counts what was recorded.
    assert len(run.llm.calls) == 3 and f"-> {len(run.llm.calls)} LLM calls" in out
    assert f"{len(public)} messages to the customers, 2 private notes, 2 conversations set open" in out
