"""The switching benchmark's scenario, machine description, summary (medians, ratios, targets) and table."""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
from typing import Any

import torch

# (step name, stack as (LoRA index, weight) pairs); the reference steps run for ours only
STACK_A = ((0, 0.8), (1, 0.6))
STACK_B = ((2, 0.9), (3, 0.7))
STACK_B2 = ((2, 0.5), (3, 0.7))
SCENARIO: tuple[tuple[str, tuple[tuple[int, float], ...]], ...] = (
    ("apply A (1+2)", STACK_A),
    ("switch A -> B (3+4)", STACK_B),
    ("move one weight (LoRA 3 0.9 -> 0.5)", STACK_B2),
    ("apply A again", STACK_A),
    ("same stack again (A -> A)", STACK_A),
    ("clear", ()),
)
# "Re-applying that one LoRA": take LoRA 3 out of B' and put it back (its layers recomputed with LoRA 4
# present, as any exact merge must); applying it alone on a clean model is shown too.
REFERENCE: tuple[tuple[str, tuple[tuple[int, float], ...]], ...] = (
    ("ref: apply LoRA 3 alone", ((2, 0.5),)),
    ("ref: clear LoRA 3", ()),
    ("ref: apply LoRA 4 alone", ((3, 0.7),)),
    ("ref: re-add LoRA 3 (-> B')", STACK_B2),
    ("ref: clear B'", ()),
)
MOVE, READD, ALONE, SAME = ("move one weight (LoRA 3 0.9 -> 0.5)", "ref: re-add LoRA 3 (-> B')",
                            "ref: apply LoRA 3 alone", "same stack again (A -> A)")
OURS = ("ours_off", "ours_on")
PEERS = ("invokeai", "diffusers")
SIDES = OURS + PEERS
NAMES = {"ours_off": "ours off", "ours_on": "ours on", "invokeai": "InvokeAI", "diffusers": "diffusers"}


def machine() -> dict[str, Any]:
    """Where the numbers come from, including the CPU kernels torch dispatches to."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpus": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(),
                            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                            "date": dt.datetime.now().isoformat(timespec="seconds"),
                            "loadavg_start": list(os.getloadavg())}  # the machine is shared: say how busy
    for var in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.partition(":")[2].strip()
                elif line.startswith("flags"):
                    info["avx512_bf16"] = "avx512_bf16" in line.split()
                    break
    except OSError:
        pass
    try:
        import diffusers
        import peft

        info |= {"diffusers": diffusers.__version__, "peft": peft.__version__}
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _median(rows: list[dict[str, dict[str, Any]]], step: str, key: str = "seconds") -> float | None:
    values = [r[step][key] for r in rows if step in r and key in r[step]]
    return statistics.median(values) if values else None


def _worst(rows: list[dict[str, dict[str, Any]]], step: str, key: str) -> dict[str, Any] | None:
    """The worst exactness result of a step over rounds (most tensors off)."""
    found = [r[step][key] for r in rows if step in r and r[step].get(key)]
    if not found:
        return None
    return max(found, key=lambda e: (e.get("differing", 0), e["tensors"] - e.get("tensors_equal", e["tensors"]),
                                     e.get("elements_off", 0), e.get("max_ulp", 0), e.get("max_abs", 0.0)))


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the measured rounds (round 0 apart), ratios, and the issue's targets."""
    measured = rounds[1:] or rounds
    sides = [s for s in SIDES if s in rounds[0]]
    steps: dict[str, dict[str, Any]] = {}
    for name, _ in SCENARIO + REFERENCE:
        entry: dict[str, Any] = {}
        for side in sides:
            entry[side] = _median([r[side] for r in measured], name)
            entry[f"{side}_first"] = rounds[0][side].get(name, {}).get("seconds")
            entry[f"{side}_exact"] = _worst([r[side] for r in rounds], name, "exact")
            entry[f"{side}_pristine"] = _worst([r[side] for r in rounds], name, "pristine")
        if "invokeai" in sides:
            entry["invokeai_unpatch"] = _median([r["invokeai"] for r in measured], name, "unpatch_seconds")
        for peer in PEERS:
            for side in OURS:
                if entry.get(peer) and entry.get(side):
                    entry[f"ratio_{peer}_{side}"] = entry[peer] / entry[side]
        steps[name] = entry
    loads = [s for r in measured for s in r.get("diffusers_load", [])]
    cold: dict[str, Any] = {}
    for variant in rounds[0].get("cold", {}):
        cold[variant] = {k: _median([r["cold"] for r in measured], variant, k) for k in ("seconds", "read", "apply")}
        cold[variant]["first"] = rounds[0]["cold"][variant]["seconds"]
        cold[variant]["samples"] = [r["cold"][variant]["seconds"] for r in measured if variant in r.get("cold", {})]
    targets: dict[str, Any] = {}
    for side in OURS:
        ratios = [steps[s].get(f"ratio_diffusers_{side}", 0.0) for s in ("apply A (1+2)", "switch A -> B (3+4)")]
        clears = [steps[s][f"{side}_pristine"] for s, stack in SCENARIO + REFERENCE if not stack]
        move, readd, alone, same = (steps[s][side] for s in (MOVE, READD, ALONE, SAME))
        targets[side] = {
            "apply_and_switch_5x": {"ratios": ratios, "met": bool(ratios) and min(ratios) >= 5.0},
            "bit_exact_restore": {"checked": all(c is not None for c in clears),
                                  "met": all(c is not None and c["differing"] == 0 for c in clears)},
            "same_stack_under_10ms": {"seconds": same, "met": same < 0.010},
            "move_le_reapply_one": {"move": move, "re_add": readd, "apply_alone": alone, "met": move <= readd},
        }
    return {"steps": steps, "diffusers_load_median": statistics.median(loads) if loads else None,
            "diffusers_load_first": rounds[0].get("diffusers_load"), "cold": cold, "targets": targets}


def sec(v: float | None) -> str:
    return "—" if v is None else (f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s")


def ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}x"


def _exact(entry: dict[str, Any], side: str) -> str:
    e = entry.get(f"{side}_pristine") or entry.get(f"{side}_exact")
    return e["text"] if e else "—"


def _load(m: dict[str, Any]) -> str:
    """1-minute load average at the start and the end of the run (other jobs share this machine)."""
    ends = [m.get("loadavg_start"), m.get("loadavg_end")]
    return " -> ".join(f"{v[0]:.1f}" for v in ends if v) or "?"


def markdown(result: dict[str, Any]) -> str:
    """The results tables: medians, ratios, worst exactness over all rounds, cold first apply."""
    s = result["summary"]
    present = [side for side in SIDES if side in result["rounds"][0]]
    peers = [p for p in PEERS if p in present]
    m = result["machine"]
    lines = [f"{result['model']['label']} ({result['model']['targets']} modules), "
             f"{result['config']['dtype']}, {result['config']['device']}; CPU capability {m.get('cpu_capability')}"
             + "".join(f", {v}={m[v]}" for v in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if v in m)
             + f"; {len(result['rounds']) - 1} measured rounds; load average {_load(m)}", ""]
    cpu = f"{m.get('cpu', '?')} {m.get('cpu_capability')}"
    head = ["step", "CPU"] + [NAMES[x] for x in present] + [f"{NAMES[p]} / ours off" for p in peers] \
        + [f"exactness {NAMES[x]}" for x in present]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in s["steps"].items():
        cells = [name, cpu] + [sec(entry.get(x)) for x in present]
        cells += [ratio(entry.get(f"ratio_{p}_ours_off")) for p in peers]
        cells += [_exact(entry, x) for x in present]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    inv = result.get("invokeai", {})
    if inv.get("measured"):
        same = s["steps"][SAME]
        loads = ", ".join(sec(v) for v in inv["load_seconds"])
        lines.append(f"InvokeAI {inv['version']}: each step = leave the previous patch context (restore) + enter the "
                     f"next (patch); 'same stack again' has no skip there (restore + re-patch, unpatch part "
                     f"{sec(same.get('invokeai_unpatch'))}). Load per file {loads}; "
                     f"its LoRAs hold {inv['lora_mb_loaded'][0]:.0f} MB each loaded, "
                     f"{inv.get('lora_mb_after', [0])[0]:.0f} MB after patching (cast to fp32 in place); "
                     f"warnings (layers it could not place): {inv.get('warnings')}.")
    else:
        lines.append(f"InvokeAI: {inv.get('reason', 'not measured')}")
    if s["diffusers_load_median"]:
        lines.append(f"diffusers load_lora_weights per file: median {sec(s['diffusers_load_median'])}; "
                     f"ours first parse per file: {', '.join(sec(v) for v in result['ours_first_parse_seconds'])}")
    if s["cold"]:
        lines += ["", "| cold first apply (2 files from disk, clean model) | median | read files | apply | round 0 |",
                  "|---|---|---|---|---|"]
        for variant, c in s["cold"].items():
            lines.append(f"| {variant} | {sec(c['seconds'])} | {sec(c['read'])} | {sec(c['apply'])} "
                         f"| {sec(c['first'])} |")
    lines.append("")
    for side, targets in s["targets"].items():
        verdicts = ", ".join(f"{k} {'NOT CHECKED' if v.get('checked') is False else 'MET' if v['met'] else 'MISSED'}"
                             for k, v in targets.items())
        lines.append(f"targets {side}: {verdicts}")
    if "snapshot_seconds" in result:
        lines.append(f"pristine copies come from the model's RAM copy (pristine_source); snapshotting them instead "
                     f"(first touch, no model cache) costs {sec(result['snapshot_seconds'])} once")
    lines.append(f"peak RSS {result['peak_rss_gb']:.1f} GB; after close: {result['after_close']['differing']} "
                 f"of {result['after_close']['tensors']} targeted weights differ from pristine; pristine source "
                 f"unchanged: {result['pristine_source_unchanged']}")
    return "\n".join(lines)


def quiet_libraries() -> None:
    """No progress bars or per-load key reports from diffusers/transformers in the benchmark output."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
