"""The dry-run report as a picture (PIL only): one row per component and UNet block; left, each input's cosine
similarity to a (one dot per input on a shared axis); right, for selection methods, the share of elements each
candidate supplies (a stacked bar). The numbers are those of `hubmix merge --dry`."""

from __future__ import annotations

import math
from typing import Any

from hubmix.render.grid import _font

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
ROW, LABEL, COS, NUM, SHARE, PAD, HEAD = 18, 150, 380, 110, 260, 12, 58


def _rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for comp, data in report.items():
        rows.append((f"{comp}", data["total"]))
        rows += [(f"  {block}", row) for block, row in data["blocks"].items()]
    return rows


def draw_report(report: dict[str, Any], *, title: str = "dry run") -> Any:
    """The report (engine.analysis) -> an RGB PIL image."""
    from PIL import Image, ImageDraw

    rows = _rows(report)
    names = list(dict.fromkeys(n for _, r in rows for n in r["inputs"]))
    cands = list(dict.fromkeys(n for _, r in rows for n in (r.get("share") or {})))
    cosines = [s["cosine"] for _, r in rows for s in r["inputs"].values() if s["cosine"] is not None]
    low = min(cosines, default=0.0)
    lo = max(-1.0, min(0.99, low - 0.1 * (1 - low)))
    lo = math.floor(lo * 1000) / 1000
    width = PAD + LABEL + COS + NUM + PAD * 2 + (SHARE if cands else 0) + PAD
    img = Image.new("RGB", (width, HEAD + len(rows) * ROW + PAD * 3), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(13), _font(11)
    d.text((PAD, 6), title, fill="black", font=font)
    x0 = PAD + LABEL
    d.text((x0, 24), "cosine similarity to a", fill="black", font=small)
    for i, n in enumerate(names):
        cx = x0 + 150 + i * 60
        d.ellipse((cx, 27, cx + 8, 35), fill=COLORS[(i + 1) % len(COLORS)])
        d.text((cx + 12, 24), n, fill="black", font=small)
    sx = x0 + COS + NUM + PAD * 2
    if cands:
        d.text((sx, 24), "share of elements from", fill="black", font=small)
        for i, n in enumerate(cands):
            cx = sx + 140 + i * 50
            d.rectangle((cx, 27, cx + 8, 35), fill=COLORS[(names.index(n) + 1 if n in names else i) % len(COLORS)])
            d.text((cx + 12, 24), n, fill="black", font=small)
    d.text((x0, 40), f"{lo:g}", fill="gray", font=small)
    d.text((x0 + COS - 8, 40), "1", fill="gray", font=small)
    for r, (name, row) in enumerate(rows):
        y = HEAD + r * ROW
        if r % 2 == 0:
            d.rectangle((PAD, y, width - PAD, y + ROW - 1), fill="#f3f3f3")
        d.text((PAD, y + 2), name, fill="black", font=small)
        d.line((x0, y + ROW // 2, x0 + COS, y + ROW // 2), fill="#bbbbbb")
        for i, n in enumerate(names):
            c = (row["inputs"].get(n) or {}).get("cosine")
            if c is None:
                continue
            px = x0 + round((max(c, lo) - lo) / (1 - lo) * COS) if lo < 1 else x0 + COS
            d.ellipse((px - 4, y + ROW // 2 - 4, px + 4, y + ROW // 2 + 4), fill=COLORS[(i + 1) % len(COLORS)])
        values = [(row["inputs"].get(n) or {}).get("cosine") for n in names]
        d.text((x0 + COS + PAD, y + 3), " ".join("-" if v is None else f"{v:.4f}" for v in values), fill="black",
               font=small)
        share = row.get("share")
        if share:
            left = sx
            for i, (n, v) in enumerate(share.items()):
                w = round(v * SHARE)
                color = COLORS[(names.index(n) + 1 if n in names else i) % len(COLORS)]
                d.rectangle((left, y + 3, left + w, y + ROW - 4), fill=color)
                left += w
            first, v = next(iter(share.items()))
            d.text((sx + 4, y + 3), f"{first} {100 * v:.1f}%", fill="white", font=small)
    return img


def save_plot(report: dict[str, Any], path: Any, title: str) -> None:
    """Draw the report into `path` (PNG) through a temporary sibling; one line if it cannot be written."""
    import os
    from pathlib import Path

    from hubmix.errors import OutputError

    path = Path(path)
    tmp = path.with_name(f".{path.name}.hubmix-tmp")
    try:
        draw_report(report, title=title).save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write the plot ({e.strerror or e})") from None
