"""Block weights by label: `LABEL=VALUE` pairs with ranges and globs (`"T00-T29=0.3,T30-T59=0.7,*=0.5"`,
`"BASE=0,IN=1,D*=0.4,*=0.5"`), the form that fits every family whatever its block count.

A pattern is a label (`IN`, `D07`, `blocks.7`, `CLIP`), a group (`BASE`: a family's text encoders), a range of one
label prefix (`T00-T29`, `blocks.0-blocks.9` or `blocks.0-9`: both ends inclusive) or a glob (`D*`, `S?5`, `*`).
Labels compare case-insensitively. Which pattern gives a label its value: **the most specific one that matches**,
in this order: an exact label, a group, a range, a glob (a glob with more literal characters before one with
fewer, so `D*` beats `*`). Two patterns of equal rank that both match one label (overlapping ranges, `D*` and
`*0`) are an error naming both, as is a pattern that matches no label of the inputs. The order of the pairs never
matters. Parsing needs no family; `assign` checks the patterns against a model's labels.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Iterable

from hubmix.errors import RecipeError, recipe_number

GLOB_CHARS = "*?["
_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def is_label_form(value: Any) -> bool:
    """Whether a block list value is the LABEL=VALUE form (a string with `=`, or a mapping)."""
    return isinstance(value, dict) or (isinstance(value, str) and "=" in value)


@dataclass(frozen=True)
class Pattern:
    text: str  # as written
    kind: str  # "label", "group", "range" or "glob"
    low: tuple[str, int] | None = None  # a range's (prefix, first number)
    high: int | None = None

    def matches(self, label: str, groups: dict[str, set[str]]) -> bool:
        t, lab = self.text.casefold(), label.casefold()
        if self.kind == "label":
            return t == lab
        if self.kind == "group":
            return lab in {x.casefold() for x in groups.get(self.text.upper(), ())}
        if self.kind == "glob":
            return fnmatch.fnmatchcase(lab, t)
        m = _NUMBERED.match(lab)
        assert self.low is not None and self.high is not None
        return bool(m) and m.group(1) == self.low[0] and self.low[1] <= int(m.group(2)) <= self.high

    @property
    def rank(self) -> tuple[int, int]:
        """Higher wins: exact label, group, range, glob (more literal characters first)."""
        if self.kind == "glob":
            return (0, sum(c not in GLOB_CHARS for c in self.text))
        return ({"range": 1, "group": 2, "label": 3}[self.kind], 0)


def parse_pattern(text: str, where: str, groups: Iterable[str] = ("BASE",)) -> Pattern:
    t = text.strip()
    if not t:
        raise RecipeError(f"{where}: an empty label before '='")
    if any(c in t for c in GLOB_CHARS):
        return Pattern(t, "glob")
    if t.upper() in set(groups):
        return Pattern(t.upper(), "group")
    if "-" in t:
        lo, _, hi = t.partition("-")
        m_lo, m_hi = _NUMBERED.match(lo.strip().casefold()), _NUMBERED.match(hi.strip().casefold())
        if not m_lo or not m_hi or (m_hi.group(1) and m_hi.group(1) != m_lo.group(1)):
            raise RecipeError(f"{where}: range {t!r}: both ends must be one label prefix with numbers "
                              "(T00-T29, blocks.0-blocks.9 or blocks.0-9)")
        a, b = int(m_lo.group(2)), int(m_hi.group(2))
        if b < a:
            raise RecipeError(f"{where}: range {t!r} runs backwards")
        return Pattern(t, "range", (m_lo.group(1), a), b)
    return Pattern(t, "label")


def parse_label_rules(value: Any, where: str) -> dict[str, float]:
    """`"A=1,B*=0.5"` or a mapping {pattern: number} -> {pattern: value} in the order given; checks the syntax,
    the numbers and duplicates (no family needed)."""
    if isinstance(value, dict):
        pairs = [(str(k), v) for k, v in value.items()]
    else:
        pairs = []
        for item in str(value).split(","):
            if not item.strip():
                continue
            if "=" not in item:
                raise RecipeError(f"{where}: {item.strip()!r} is not LABEL=VALUE (mixing a plain list with "
                                  "labels is not allowed)")
            k, _, v = item.partition("=")
            pairs.append((k.strip(), v.strip()))
    if not pairs:
        raise RecipeError(f"{where}: no LABEL=VALUE pairs")
    out: dict[str, float] = {}
    seen: dict[str, str] = {}
    for k, v in pairs:
        parse_pattern(k, where)
        num = recipe_number(v, f"{where}: {k}={{got}} is not a number")
        if k.casefold() in seen:
            raise RecipeError(f"{where}: {k!r} is given twice")
        seen[k.casefold()] = k
        out[k] = num
    return out


def assign(rules: dict[str, float], labels: list[str], groups: dict[str, set[str]], where: str) -> dict[str, float]:
    """{label: value} for each of `labels` (in order) that some pattern matches, by the most specific pattern.
    `groups`: group name (BASE) -> the labels it stands for. A pattern matching none of `labels` is an error."""
    patterns = [(parse_pattern(k, where, groups), v) for k, v in rules.items()]
    for p, _ in patterns:
        if not any(p.matches(label, groups) for label in labels):
            raise RecipeError(f"{where}: {p.text!r} matches no block of these models (theirs: "
                              f"{summarize(labels, groups)})")
    out: dict[str, float] = {}
    for label in labels:
        hits = [(p, v) for p, v in patterns if p.matches(label, groups)]
        if not hits:
            continue
        best = max(p.rank for p, _ in hits)
        top = [(p, v) for p, v in hits if p.rank == best]
        if len(top) > 1:
            raise RecipeError(f"{where}: {top[0][0].text!r} and {top[1][0].text!r} both match {label} and neither "
                              "is more specific; make them not overlap")
        out[label] = top[0][1]
    return out


def summarize(labels: list[str], groups: dict[str, set[str]] | None = None) -> str:
    """`IN, D00..D18, S00..S37, OUT, CLIP, T5, BASE`: runs of one prefix shown as first..last."""
    parts: list[str] = []
    run: list[str] = []
    prefix = None
    for label in list(labels) + [None]:  # type: ignore[list-item]
        m = _NUMBERED.match(label) if label is not None else None
        p = m.group(1) if m else None
        if run and (p is None or p != prefix):
            parts.append(run[0] if len(run) == 1 else f"{run[0]}..{run[-1]}")
            run = []
        if label is None:
            break
        if m:
            prefix = p
            run.append(label)
        else:
            parts.append(label)
    return ", ".join(parts + sorted(g for g, members in (groups or {}).items() if members))
