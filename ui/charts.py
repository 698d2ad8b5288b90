"""The Report tab's charts as plain SVG: time per phase on a log axis, peak memory with a point per run.

Gradio's native plots have no log scale, and a line plot draws nothing for a single point: a
first run (a model load, seconds) next to warm runs (tenths of a second) left the warm runs as
slivers, and the memory chart stayed blank until the second generation. Here each bar's height is
the generation's total time on a log axis (every run stays visible), split into its phases by
their share of that total; the memory chart marks every run with a dot. Pure functions of the
reports: no Gradio, testable alone. Hovering a bar or a dot shows its numbers (SVG <title>).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from studio.report import Report

_MB = 1024 * 1024
PALETTE = {"model_load": "#7c3aed", "preview_fit": "#a78bfa", "lora_load": "#0ea5e9", "lora_patch": "#06b6d4",
           "lora_unpatch_reload": "#14b8a6", "text_encode": "#f59e0b", "denoise": "#ef4444",
           "vae_decode": "#22c55e", "save": "#64748b"}
OTHER = "#94a3b8"
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 34, 40


def _numbered(history: Sequence[Report], shown: int) -> list[tuple[str, Report]]:
    start = max(0, len(history) - shown)
    width = len(str(len(history)))
    return [(f"#{i + 1:0{width}d}", r) for i, r in enumerate(list(history)[start:], start)]


def _seconds(value: float) -> str:
    return f"{value:.3g} s" if value < 10 else f"{value:.0f} s"


def _frame(width: int, height: int, title: str, body: list[str], legend: list[tuple[str, str]]) -> str:
    items, x = [], LEFT
    for colour, label in legend:
        items.append(f'<rect x="{x}" y="{height - 14}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{x + 14}" y="{height - 5}" font-size="11">{escape(label)}</text>')
        x += 24 + 6.5 * len(label)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" '
            f'role="img" aria-label="{escape(title)}" style="font-family: sans-serif; fill: currentColor">'
            f'<text x="{LEFT}" y="18" font-size="14" font-weight="600">{escape(title)}</text>'
            + "".join(body) + "".join(items) + "</svg>")


def phase_chart(history: Sequence[Report], labels: dict[str, str], shown: int = 30, width: int = 900,
                height: int = 300) -> str:
    """Stacked bars, one per generation: height = total seconds on a log axis, segments = phase shares."""
    numbered = _numbered(history, shown)
    title = "Time per phase (bar height: total time, log scale; colours: each phase's share)"
    if not numbered:
        return _frame(width, 80, title, ['<text x="64" y="50" font-size="12">No generation yet.</text>'], [])
    totals = [max(r.phases.get("total") or sum(v for k, v in r.phases.items() if k != "total"), 1e-4)
              for _, r in numbered]
    low = 10 ** math.floor(math.log10(min(totals)))
    high = 10 ** math.ceil(math.log10(max(totals) * 1.0001))
    if high <= low:
        high = low * 10
    plot_h = height - TOP - BOTTOM - 14
    base = TOP + plot_h

    def y(value: float) -> float:
        return base - plot_h * (math.log10(value) - math.log10(low)) / (math.log10(high) - math.log10(low))

    body = []
    decade = low
    while decade <= high * 1.0001:
        body.append(f'<line x1="{LEFT}" x2="{width - RIGHT}" y1="{y(decade):.1f}" y2="{y(decade):.1f}" '
                    f'stroke="currentColor" stroke-opacity="0.15"/>'
                    f'<text x="{LEFT - 6}" y="{y(decade) + 4:.1f}" font-size="11" text-anchor="end">'
                    f'{escape(_seconds(decade))}</text>')
        decade *= 10
    slot = (width - LEFT - RIGHT) / len(numbered)
    bar = min(48.0, slot * 0.7)
    seen: dict[str, str] = {}
    every = max(1, math.ceil(len(numbered) / 15))  # at most ~15 labels under the bars
    for i, ((label, report), total) in enumerate(zip(numbered, totals)):
        x = LEFT + slot * i + (slot - bar) / 2
        top, parts = y(total), [(k, v) for k, v in report.phases.items() if k != "total" and v > 0]
        span, cursor = base - top, base
        whole = sum(v for _, v in parts) or total
        for name, seconds in parts:
            h = span * seconds / whole
            colour = PALETTE.get(name, OTHER)
            seen.setdefault(name, colour)
            body.append(f'<rect class="phase-bar" data-generation="{label}" data-phase="{name}" x="{x:.1f}" '
                        f'y="{cursor - h:.1f}" width="{bar:.1f}" height="{max(h, 0.5):.1f}" fill="{colour}">'
                        f'<title>{label} {escape(labels.get(name, name))}: {_seconds(seconds)} '
                        f'({100 * seconds / whole:.0f} %)</title></rect>')
            cursor -= h
        body.append(f'<rect class="run-bar" data-generation="{label}" x="{x:.1f}" y="{top:.1f}" width="{bar:.1f}" '
                    f'height="{span:.1f}" fill="none"><title>{label}: {_seconds(total)} in all</title></rect>')
        if i % every == 0:
            body.append(f'<text x="{x + bar / 2:.1f}" y="{base + 16}" font-size="11" text-anchor="middle">'
                        f'{label}</text>')
    legend = [(colour, labels.get(name, name)) for name, colour in PALETTE.items() if name in seen]
    legend += [(colour, labels.get(name, name)) for name, colour in seen.items() if name not in PALETTE]
    return _frame(width, height, title, body, legend)


def memory_chart(history: Sequence[Report], shown: int = 30, width: int = 900, height: int = 260) -> str:
    """Peak RAM (and VRAM where measured) per generation from zero, a dot on every run."""
    numbered = _numbered(history, shown)
    title = "Peak memory per generation"
    if not numbered:
        return _frame(width, 80, title, ['<text x="64" y="50" font-size="12">No generation yet.</text>'], [])
    series = {"peak RAM": ("#2563eb", "peak_rss"), "peak VRAM": ("#dc2626", "cuda_peak_allocated")}
    values = {name: [(label, r.memory.get(key)) for label, r in numbered] for name, (_, key) in series.items()}
    top = max((v for points in values.values() for _, v in points if v), default=_MB) / _MB
    step = 10 ** max(0, len(str(int(top * 1.1))) - 1)
    ceiling = max(step, -(-top * 1.1 // step) * step)
    plot_h = height - TOP - BOTTOM - 14
    base = TOP + plot_h
    slot = (width - LEFT - RIGHT) / len(numbered)
    body = []
    for k in range(5):
        mb = ceiling * k / 4
        yy = base - plot_h * k / 4
        body.append(f'<line x1="{LEFT}" x2="{width - RIGHT}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="currentColor" '
                    f'stroke-opacity="0.15"/><text x="{LEFT - 6}" y="{yy + 4:.1f}" font-size="11" '
                    f'text-anchor="end">{mb:,.0f} MB</text>')
    legend = []
    every = max(1, math.ceil(len(numbered) / 15))
    for i, (label, _) in enumerate(numbered):
        if i % every == 0:
            body.append(f'<text x="{LEFT + slot * (i + 0.5):.1f}" y="{base + 16}" font-size="11" '
                        f'text-anchor="middle">{label}</text>')
    for name, (colour, _) in series.items():
        points = [(LEFT + slot * (i + 0.5), base - plot_h * (v / _MB) / ceiling, label, v)
                  for i, (label, v) in enumerate(values[name]) if v]
        if not points:
            continue
        legend.append((colour, name))
        if len(points) > 1:
            path = " ".join(f"{x:.1f},{yy:.1f}" for x, yy, _, _ in points)
            body.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        body += [f'<circle class="memory-point" data-measure="{name}" cx="{x:.1f}" cy="{yy:.1f}" r="4" '
                 f'fill="{colour}"><title>{label} {name}: {v / _MB:,.1f} MB</title></circle>'
                 for x, yy, label, v in points]
    return _frame(width, height, title, body, legend)
