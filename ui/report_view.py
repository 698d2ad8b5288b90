"""Render an engine Report as Markdown for the panel under the image."""

from __future__ import annotations

from studio.report import Report

_MB = 1024 * 1024
_PHASE_LABELS = {
    "model_load": "model load",
    "text_encode": "text encode",
    "denoise": "denoise",
    "vae_decode": "VAE decode",
    "save": "save PNG",
    "total": "total",
}


def render_report(report: Report) -> str:
    phases = report.phases
    rows = [f"| {_PHASE_LABELS.get(name, name.replace('_', ' '))} | {seconds:.3f} s |"
            for name, seconds in phases.items() if name != "total"]
    if "total" in phases:
        rows.append(f"| **total** | **{phases['total']:.3f} s** |")
    steps = report.step_seconds
    step_line = (f"{len(steps)} steps, {report.it_per_s:.2f} it/s "
                 f"(fastest {min(steps):.3f} s, slowest {max(steps):.3f} s)") if steps else "no steps ran"
    mem = report.memory
    mem_rows = [f"| peak RAM (RSS) | {mem.get('peak_rss', 0) / _MB:,.0f} MB |"]
    if "cuda_peak_allocated" in mem:
        mem_rows.append(f"| peak VRAM allocated | {mem['cuda_peak_allocated'] / _MB:,.0f} MB |")
        mem_rows.append(f"| peak VRAM reserved | {mem['cuda_peak_reserved'] / _MB:,.0f} MB |")
    req = report.request
    model = report.model
    head = (f"**{model.get('name')}** ({'built-in demo model' if model.get('demo') else model.get('kind')}, "
            f"hash {model.get('hash')}) on {report.device}/{report.dtype} · seed {req.get('seed')} · "
            f"{req.get('width')}x{req.get('height')} · {req.get('sampler')} · CFG {req.get('cfg')}")
    return "\n".join([head, "", step_line, "", "| phase | time |", "|---|---|", *rows, "",
                      "| memory | |", "|---|---|", *mem_rows])
