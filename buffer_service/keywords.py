"""Words a customer writes, matched as people read them: whole words, any case, with or without
accents ("Atendênte" is "atendente"), a phrase across any spacing."""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache


def fold(text: str) -> str:
    """Lower case without accents: "Atendênte" and "atendente" are one word to a customer."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


def parse_keywords(raw: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(k for k in (fold(" ".join(w.split())) for w in raw.split(",")) if k))


@lru_cache(maxsize=16)
def _pattern(keywords: tuple[str, ...]) -> re.Pattern[str]:
    words = "|".join(r"\s+".join(map(re.escape, k.split())) for k in keywords)
    # Whole words: no letter or digit on either side ("agente" does not contain "agent").
    return re.compile(rf"(?<!\w)(?:{words})(?!\w)")


def keyword_in(text: str, keywords: tuple[str, ...]) -> str:
    """The first of `keywords` that `text` contains as whole words, or ""."""
    if not keywords or not text:
        return ""
    found = _pattern(keywords).search(fold(text))
    return " ".join(found.group(0).split()) if found else ""
