"""Dry-run statistics: how similar the inputs are, per component and per block, before a long merge.

For every input x other than the first (a): cosine similarity to a, relative L2 distance |x - a| / |a|, and the
least-squares scale <a,x>/<x,x> that best maps x onto a (the alpha/beta users of lossless otherwise guess). For
selection methods (lossless, maxdiff): the share of elements each candidate would supply. Sums run per chunk
through the same engine as a merge, so a dry run reads each input once and writes nothing.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from hubmix.engine import pipeline as engine
from hubmix.engine.pipeline import Job
from hubmix.engine.plan import Task


@dataclass
class _Acc:
    aa: float = 0.0
    numel: int = 0
    dot: dict[int, float] = field(default_factory=dict)  # input index -> <a, x>
    xx: dict[int, float] = field(default_factory=dict)
    dd: dict[int, float] = field(default_factory=dict)  # |x - a|^2
    first: int = 0  # elements a selection method takes from its first candidate
    selection: tuple[int, int] | None = None

    def add(self, other: "_Acc") -> None:
        self.aa += other.aa
        self.numel += other.numel
        self.first += other.first
        self.selection = self.selection or other.selection
        for d_self, d_other in ((self.dot, other.dot), (self.xx, other.xx), (self.dd, other.dd)):
            for k, v in d_other.items():
                d_self[k] = d_self.get(k, 0.0) + v


class Stats:
    """Accumulates per (component, block) sums; thread-safe."""

    def __init__(self, names: dict[str, list[str]]):
        self.names = names  # component -> model names in method order
        self.groups: dict[tuple[str, str | None], _Acc] = {}
        self.params: dict[tuple[str, str | None], dict[str, float]] = {}  # the method's values per block
        self._lock = threading.Lock()

    def consume(self, job: Job, views: list[torch.Tensor]) -> None:
        task = job.task
        xs = [v.float().reshape(-1) if task.channels is None else v.float().narrow(1, 0, task.channels).reshape(-1)
              for v in views]
        acc = _Acc(numel=xs[0].numel())
        a = xs[0]
        acc.aa = float(torch.dot(a, a))
        for i, x in enumerate(xs[1:], start=1):
            d = x - a
            acc.dot[i] = float(torch.dot(a, x))
            acc.xx[i] = float(torch.dot(x, x))
            acc.dd[i] = float(torch.dot(d, d))
        m = task.method
        if m is not None and m.choose is not None:
            acc.first = int(m.choose(xs, **task.params).sum())
            acc.selection = m.candidate_names(len(xs)) if m.candidate_names else (1, 2)
        with self._lock:
            self.groups.setdefault((task.component, task.block), _Acc()).add(acc)
            self.params.setdefault((task.component, task.block), dict(task.params))

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for comp in dict.fromkeys(c for c, _ in self.groups):
            total = _Acc()
            blocks = {}
            order = _order_for([b for c, b in self.groups if c == comp])
            for (c, block), acc in sorted(self.groups.items(), key=lambda kv: _block_order(kv[0][1], order)):
                if c != comp:
                    continue
                total.add(acc)
                if block is not None:
                    blocks[block] = {**self._row(comp, acc), "params": self.params[(c, block)]}
            out[comp] = {"total": self._row(comp, total), "blocks": blocks}
        return out

    def _row(self, comp: str, acc: _Acc) -> dict[str, Any]:
        names = self.names[comp]
        row: dict[str, Any] = {"elements": acc.numel, "inputs": {}}
        for i in sorted(acc.dot):
            xx, dot, dd = acc.xx[i], acc.dot[i], acc.dd[i]
            row["inputs"][names[i]] = {
                "cosine": dot / math.sqrt(acc.aa * xx) if acc.aa > 0 and xx > 0 else None,
                "rel_l2": math.sqrt(dd / acc.aa) if acc.aa > 0 else None,
                "ls_scale": dot / xx if xx > 0 else None,
            }
        if acc.selection is not None and acc.numel:
            x, y = acc.selection
            row["share"] = {names[x]: acc.first / acc.numel, names[y]: 1 - acc.first / acc.numel}
        return row


def _split_label(label: str) -> tuple[str, int]:
    prefix = label.rstrip("0123456789")
    return prefix, int(label[len(prefix):] or -1)


def _order_for(labels: list[str | None]) -> list[str]:
    """The layout's `block_order` (label prefixes in model order) that covers a component's labels."""
    from hubmix.formats.families import layouts

    prefixes = {_split_label(x)[0] for x in labels if x is not None}
    for data in layouts().values():
        if prefixes <= set(data.get("block_order") or ()):
            return list(data["block_order"])
    return sorted(prefixes)


def _block_order(label: str | None, order: list[str]) -> tuple[int, int]:
    if label is None:
        return (len(order) + 1, 0)
    prefix, number = _split_label(label)
    return (order.index(prefix) if prefix in order else len(order), number)


def analyze(tasks: list[Task], names: dict[str, list[str]], *, quiet: bool = False,
            workers: int | None = None) -> dict[str, Any]:
    stats = Stats(names)
    merged = [t for t in tasks if t.method is not None]
    workers = workers or engine.default_workers()
    with engine.parallel_across_chunks(workers):
        engine.run(engine.split_jobs(merged), stats.consume, workers=workers, desc="analyzing", quiet=quiet)
    return stats.report()


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.4f}"


def render(report: dict[str, Any]) -> str:
    """The table; each block row ends with the parameters its tensors merge with (block lists expanded)."""
    w = max([6] + [len(b) for data in report.values() for b in data["blocks"]]) + 1
    lines = [f"{'component':<15}{'block':<{w}}{'input':<8}{'cosine':>9}{'rel L2':>9}{'ls scale':>10}  share / params"]
    for comp, data in report.items():
        rows = [("all", data["total"])] + list(data["blocks"].items())
        for block, row in rows:
            share = ", ".join(f"{n} {_fmt(v, True)}" for n, v in (row.get("share") or {}).items())
            params = " ".join(f"{k}={v:g}" for k, v in (row.get("params") or {}).items())
            tail = "  ".join(x for x in (share, params) if x)
            for j, (name, s) in enumerate(row["inputs"].items()):
                lines.append(f"{comp if block == 'all' and j == 0 else '':<15}{block if j == 0 else '':<{w}}"
                             f"{name:<8}{_fmt(s['cosine']):>9}{_fmt(s['rel_l2']):>9}{_fmt(s['ls_scale']):>10}  "
                             f"{tail if j == 0 else ''}")
    return "\n".join(lines)
