"""Render engine Reports for people: a table for one generation, data frames for the session.

Pure functions over `studio.report.Report`; no Gradio here, so they test in isolation.
"""

from __future__ import annotations

from typing import Iterable

from studio.report import Report, load_breakdown

_MB = 1024 * 1024
PHASE_LABELS = {
    "model_load": "model load",
    "lora_load": "LoRA load",
    "lora_patch": "LoRA patch",
    "lora_unpatch_reload": "LoRA unpatch (reload)",
    "lora_step_switch": "LoRA step switch (start=/stop=)",
    "text_encode": "text encode",
    "denoise": "denoise",
    "vae_decode": "VAE decode",
    "save": "save PNG",
    "preview_fit": "live preview fit",
}
HISTORY_SHOWN = 30  # generations in the charts


def phase_label(name: str) -> str:
    return PHASE_LABELS.get(name, name.replace("_", " "))


def _mb(value: float | int | None) -> str:
    """MB, with a decimal below 10 MB so that the tiny demo model's sizes do not all read "0 MB"."""
    if value is None:
        return "–"
    mb = value / _MB
    return f"{mb:,.1f} MB" if 0 < mb < 10 else f"{mb:,.0f} MB"


def summary_line(report: Report) -> str:
    """One line under the image: what ran and how long it took."""
    req, phases = report.request, report.phases
    steps = report.step_seconds
    speed = f"{len(steps)} steps at {report.it_per_s:.2f} it/s" if steps else "no steps ran"
    return (f"seed {req.get('seed')} · {req.get('width')}×{req.get('height')} · {speed} · "
            f"total {phases.get('total', 0.0):.2f} s · peak RAM {_mb(report.memory.get('peak_rss'))}")


def render_report(report: Report) -> str:
    """The last generation as Markdown: header, phases with their share of the time, memory, LoRA."""
    phases = report.phases
    total = phases.get("total") or sum(v for k, v in phases.items() if k != "total") or 1.0
    rows = [f"| {phase_label(name)} | {seconds:.3f} s | {100 * seconds / total:.0f} % |"
            for name, seconds in phases.items() if name != "total"]
    if "total" in phases:
        rows.append(f"| **total** | **{phases['total']:.3f} s** | 100 % |")
    steps = report.step_seconds
    step_line = (f"{len(steps)} steps, {report.it_per_s:.2f} it/s "
                 f"(fastest {min(steps):.3f} s, slowest {max(steps):.3f} s)") if steps else "no steps ran"
    req, model = report.request, report.model
    head = (f"**{model.get('name')}** ({'built-in demo model' if model.get('demo') else model.get('kind')}, "
            f"hash {model.get('hash')}) on {report.device}/{report.dtype} · seed {req.get('seed')} · "
            f"{req.get('width')}×{req.get('height')} · {req.get('sampler')} · CFG {req.get('cfg')}")
    why = [f"Precision: {report.dtype_reason}"] if report.dtype_reason else []  # older reports have none
    loaded = load_breakdown(report.model) if "model_load" in phases else ""
    lines = [head, *why, "", step_line, *(["", f"Model load: {loaded}"] if loaded else []), "",
             "| phase | time | share |", "|---|---:|---:|", *rows, "", *render_memory(report.memory)]
    if report.lora:
        lines += ["", *render_lora(report.lora)]
    preview = render_preview(report.preview)
    if preview:
        lines += ["", preview]
    if report.status != "ok":
        lines += ["", f"Status: **{report.status}**"]
    return "\n".join(lines)


def render_preview(preview: dict) -> str:
    """The live preview's line: how often, and what it cost per step (measured, next to a step's time)."""
    if not preview:
        return ""
    if not preview.get("enabled"):
        return "Live preview: off (Preferences → Live preview)."
    images = preview.get("images", 0)
    line = (f"Live preview: {images} picture{'' if images == 1 else 's'} "
            f"(every {preview.get('every_steps', '?')} steps), **{preview.get('ms_per_step', 0.0):.3f} ms per step**")
    if preview.get("shows"):
        line += f", showing the sampler's {preview['shows']}" if preview["shows"] != "latents" else \
            ", showing the raw latents (this sampler gives no denoised estimate)"
    if "share_of_step" in preview:
        line += f" ({100 * preview['share_of_step']:.2f} % of a step)"
    if "fit_seconds" in preview:
        line += f"; its colour map was fitted to this VAE in {preview['fit_seconds']:.2f} s"
    return line + "."


def render_memory(mem: dict) -> list[str]:
    """The report's `memory` section: the mode that ran, where each component's weights are, and the totals.

    Older reports (and callers that measure only RSS) have just the peaks: those rows are shown alone.
    """
    lines: list[str] = []
    if mem.get("mode"):
        asked = mem.get("mode_requested")
        mode = f"Memory mode **{mem['mode']}**" + (f" (asked: {asked})" if asked and asked != mem["mode"] else "")
        lines += [" · ".join([mode, *mem.get("notes", [])]), ""]
    components = mem.get("components") or {}
    if components:
        lines += ["| component | weights | where | on the device |", "|---|---:|---|---:|"]
        for name, c in components.items():
            where = str(c.get("where", "?")) + (" (moved in for its phase)" if c.get("on_demand") else "")
            lines.append(f"| {name} | {_mb(c.get('bytes'))} | {where} | {_mb(c.get('device_bytes'))} |")
        lines.append("")
    # the two RAM rows always (every report has them), the others only where this report measured them
    measured = [("peak VRAM allocated", mem.get("cuda_peak_allocated")),
                ("peak VRAM reserved", mem.get("cuda_peak_reserved")), ("pinned RAM", mem.get("pinned_bytes")),
                ("model cache in RAM", mem.get("cache_ram_bytes")), ("LoRA cache", mem.get("lora_cache_bytes")),
                ("copied host → device", mem.get("h2d_bytes"))]
    stream = mem.get("stream") or {}
    if stream:
        measured.append((f"stream buffers (lookahead {stream.get('lookahead', '?')})", stream.get("reserved_bytes")))
    rows = [("peak RAM (RSS)", mem.get("peak_rss")), ("RAM after (RSS)", mem.get("rss")),
            *((label, value) for label, value in measured if value is not None)]
    return [*lines, "| memory | |", "|---|---:|", *(f"| {label} | {_mb(value)} |" for label, value in rows)]


def render_lora(lora: dict) -> list[str]:
    """The report's `lora` section: the stack (with unmatched keys, never hidden), patch, unpatch, cache."""
    lines: list[str] = []
    stack = lora.get("stack") or []
    if stack:
        lines += ["| LoRA | weight | format | layers | unmatched keys | cache |", "|---|---:|---|---:|---|---|"]
        for row in stack:
            unmatched = row.get("unmatched_keys", 0)
            examples = ", ".join(f"`{k}`" for k in row.get("unmatched_examples", []))
            keys = f"{unmatched}: {examples}" if unmatched and examples else str(unmatched)
            weight = f"{row.get('weight')}" + (f" `{row['options']}`" if row.get("options") else "")
            lines.append(f"| {row.get('name')} (`{row.get('hash', '')}`) | {weight} | "
                         f"{row.get('format', '')} | {row.get('layers', '')} | {keys} | {row.get('cache', '')} |")
        lines.append("")
    else:
        lines.append("No LoRAs in this generation.")
    patch, unpatch, cache = lora.get("patch") or {}, lora.get("unpatch") or {}, lora.get("cache") or {}
    details = []
    if patch:
        details.append(f"patch: {patch.get('tensors_touched', 0)} tensors changed, "
                       f"{patch.get('tensors_skipped', 0)} unchanged, {1000 * float(patch.get('seconds', 0.0)):.1f} ms")
    if unpatch:
        seconds = _unpatch_seconds(unpatch)
        details.append(f"unpatch: {str(unpatch.get('method', '?')).replace('_', ' ')}, {unpatch.get('tensors', 0)} "
                       f"tensors" + (f", {1000 * seconds:.1f} ms" if seconds is not None else ""))
    if cache:
        details.append(f"LoRA cache: {cache.get('entries', 0)} files, {_mb(cache.get('bytes'))} of "
                       f"{_mb(cache.get('budget_bytes'))}, {cache.get('hits', 0)} hits, "
                       f"{cache.get('misses', 0)} misses")
    if "unpatch_lora_by_vram_offload" in lora:
        details.append(f"mode {lora.get('mode', '?')}, unpatch_lora_by_vram_offload "
                       f"{'on' if lora['unpatch_lora_by_vram_offload'] else 'off'}")
    for switch in lora.get("step_switches") or []:  # a start=/stop= boundary
        work = (f"{switch.get('tensors_touched', 0)} tensors rewritten" if switch.get("method") == "incremental"
                else f"{switch.get('sidecars_gated', 0)} sidecars gated")
        details.append(f"step {switch.get('step')}: {work} in {1000 * float(switch.get('seconds', 0.0)):.1f} ms")
    if lora.get("scrub"):
        details.append(f"live scrub: {float(lora['scrub'].get('latency_seconds', 0.0)):.2f} s from the last slider "
                       "change to this image")
    return lines + [" · ".join(details)] if details else lines


def _unpatch_seconds(entry: dict) -> float | None:
    for key in ("switch_seconds", "seconds"):
        if isinstance(entry.get(key), (int, float)) and not isinstance(entry.get(key), bool):
            return float(entry[key])
    return None


def unpatch_costs(history: Iterable[Report]) -> dict[str, tuple[float, int]]:
    """The last measured cost of each LoRA unpatch path: method -> (seconds, generation number).

    Reads `report.lora["unpatch"] = {"method": ..., "switch_seconds" (or "seconds"): ...}`
    from the reports; a generation that took nothing off (method "none") measures nothing.
    No number is estimated.
    """
    costs: dict[str, tuple[float, int]] = {}
    for number, report in enumerate(history, 1):
        entry = report.lora.get("unpatch") if isinstance(report.lora, dict) else None
        if not isinstance(entry, dict) or entry.get("method") in (None, "none"):
            continue
        seconds = _unpatch_seconds(entry)
        if seconds is not None:
            costs[str(entry["method"])] = (seconds, number)
    return costs


def render_unpatch_costs(history: Iterable[Report]) -> str:
    costs = unpatch_costs(history)
    if not costs:
        return ("Last measured cost of each unpatch path: **not measured yet** (no generation of this session has "
                "taken a LoRA off).")
    parts = [f"{method.replace('_', ' ')}: **{seconds * 1000:.1f} ms** (generation #{number})"
             for method, (seconds, number) in sorted(costs.items())]
    return "Last measured cost of each unpatch path: " + " · ".join(parts)
