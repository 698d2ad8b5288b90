"""The LoRA stack rows and the `<lora:name:weight>` tags in the prompt, kept in step both ways.

Single source of truth: the **rows** (a list of {"name", "weight", "enabled"} dicts in a
gr.State; a row with more than a weight also has "options", the canonical
`unet=..:lbw=..:start=..:stop=..` text of studio.lora.spec, which its tag carries too). The
prompt's tags mirror the enabled rows, so what one sees in the prompt is what runs. Editing the prompt by hand is folded back into the rows on blur (and once more
when Generate runs, so a click straight from the keyboard still counts). Generate then
sends the prompt text *without* tags plus `loras=` from the enabled rows, so the session
never sees a LoRA twice.

The rules, as pure functions:
- rows -> prompt: a tag whose name is an enabled row stays where it is (rewritten only
  when its weight changed); tags of removed or disabled rows go (with one space); enabled
  rows without a tag are appended at the end; a name's later duplicate tags go; moving
  rows swaps the tags' places.
- prompt -> rows: a tag turns its row on with the tag's weight and options (a repeated name
  keeps its last mention, as the session does); an enabled row whose tag was deleted goes;
  disabled rows stay; unknown names become rows too (the panel shows them as missing).
Tags are found by the engine's own parser (studio.lora.spec); one that does not parse (still
being typed) is left alone here, and Generate reports it as an error.
A row may also carry UI-only keys ("scrub", "preview_steps": the live weight scrub;
"blocks_open": its panel is open), which never reach a tag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from studio.errors import SettingsError
from studio.lora.spec import LoraSpec, spec_of
from studio.lora.spec import find_tags as find_spec_tags

Row = dict[str, Any]  # {"name": str, "weight": float, "enabled": bool[, "options": str][, "scrub": bool, ...]}
_EPS = 1e-6
UI_KEYS = ("scrub", "preview_steps", "blocks_open")  # the live scrub's settings, the panel's state: never in a tag


@dataclass(frozen=True)
class Tag:
    start: int
    end: int
    name: str
    weight: float
    text: str
    options: str = ""


def fmt(weight: float) -> str:
    """1.0 -> "1", 0.75 -> "0.75", 0.7000000001 -> "0.7"."""
    return f"{round(float(weight), 4):g}"


def tag(name: str, weight: float, options: str = "") -> str:
    if not options:
        return f"<lora:{name}:{fmt(weight)}>"
    return spec_of((name, round(float(weight), 4), options)).tag()


def options_of(row: Row) -> str:
    return str(row.get("options") or "")


def find_tags(prompt: str) -> list[Tag]:
    found = []
    for start, end, spec in find_spec_tags(prompt or "", strict=False):
        if spec is not None:
            found.append(Tag(start, end, spec.name, spec.weight, prompt[start:end], spec.options))
    return found


def prompt_stack(prompt: str) -> dict[str, tuple[float, str]]:
    """name -> (weight, options) of the prompt's tags, in order of first mention; a repeated name keeps its last."""
    stack: dict[str, tuple[float, str]] = {}
    for t in find_tags(prompt):
        stack[t.name] = (t.weight, t.options)
    return stack


def strip_tags(prompt: str) -> str:
    """The prompt text the model sees: tags out, doubled spaces closed (as split_lora_tags does)."""
    text = prompt or ""
    for t in reversed(find_tags(text)):
        text = text[:t.start] + text[t.end:]
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def clean_rows(rows: Iterable[Any] | None) -> list[Row]:
    """Well-formed rows, one per name (the first wins): what a gr.State may hold after any edit."""
    out: list[Row] = []
    seen: set[str] = set()
    for row in rows or []:
        if not isinstance(row, dict) or not str(row.get("name", "")).strip() or row["name"] in seen:
            continue
        seen.add(row["name"])
        clean: Row = {"name": str(row["name"]), "weight": float(row.get("weight", 1.0)),
                      "enabled": bool(row.get("enabled", True))}
        options = _canonical(clean["name"], clean["weight"], options_of(row))
        if options:
            clean["options"] = options
        for key in UI_KEYS:
            if row.get(key):
                clean[key] = int(row[key]) if key == "preview_steps" else True
        out.append(clean)
    return out


def _canonical(name: str, weight: float, options: str) -> str:
    """The options in the engine's canonical form; text it cannot read is kept for Generate to report."""
    if not options:
        return ""
    try:
        return spec_of((name, weight, options)).options
    except SettingsError:
        return options


def stack_of(rows: Iterable[Row]) -> tuple[tuple, ...]:
    """The request entries Generate sends: enabled rows, in order, (name, weight[, options])."""
    return tuple((r["name"], float(r["weight"]), r["options"]) if r.get("options") else (r["name"], float(r["weight"]))
                 for r in clean_rows(rows) if r["enabled"])


def spec_of_row(row: Row) -> LoraSpec:
    """The row as the engine reads it (raises SettingsError for options that do not parse)."""
    return spec_of((row["name"], float(row["weight"]), options_of(row)))


def prompt_from_rows(prompt: str, rows: Iterable[Row]) -> str:
    """Rewrite the prompt's tags to mirror the enabled rows; every other character stays in place."""
    prompt = prompt or ""
    enabled = [r for r in clean_rows(rows) if r["enabled"]]
    weights = {r["name"]: r["weight"] for r in enabled}
    options = {r["name"]: options_of(r) for r in enabled}
    tags = find_tags(prompt)
    first: dict[str, Tag] = {}
    for t in tags:
        if t.name in weights and t.name not in first:
            first[t.name] = t
    slots = sorted(first.values(), key=lambda t: t.start)
    ordered = [r["name"] for r in enabled if r["name"] in first]  # row order decides which tag sits where
    filling = {slot.start: name for slot, name in zip(slots, ordered)}
    out, pos = [], 0
    for t in tags:
        start, end = t.start, t.end
        name = filling.get(t.start)
        if name is None:  # removed, disabled or a duplicate: drop it and one space beside it
            if start > pos and prompt[start - 1] == " ":
                start -= 1
            elif end < len(prompt) and prompt[end] == " " and (start == pos or prompt[start - 1] in "\n\t"):
                end += 1
            out.append(prompt[pos:start])
        else:
            source = first[name]
            same = abs(source.weight - weights[name]) < _EPS and source.options == options[name]
            out.append(prompt[pos:start] + (source.text if same else tag(name, weights[name], options[name])))
        pos = end
    out.append(prompt[pos:])
    text = "".join(out)
    for r in enabled:
        if r["name"] not in first:
            text += ("" if not text or text[-1].isspace() else " ") + tag(r["name"], r["weight"], options_of(r))
    return text


def rows_from_prompt(prompt: str, rows: Iterable[Row]) -> list[Row]:
    """The rows after a hand edit of the prompt (see the module docstring for the rules)."""
    rows = clean_rows(rows)
    stack = prompt_stack(prompt)
    by_name = {r["name"]: r for r in rows}

    def from_tag(name: str, weight: float, options: str) -> Row:
        new: Row = {"name": name, "weight": float(weight), "enabled": True}
        if options:
            new["options"] = options
        old = by_name.get(name, {})
        new.update({k: old[k] for k in UI_KEYS if k in old})  # the scrub settings stay with the row
        return new

    tagged = iter([from_tag(n, w, o) for n, (w, o) in stack.items() if n in by_name])
    out: list[Row] = []
    for row in rows:
        if row["name"] in stack:
            out.append(next(tagged))  # the tags' order decides the order of the rows they name
        elif not row["enabled"]:
            out.append(row)
    out += [from_tag(n, w, o) for n, (w, o) in stack.items() if n not in by_name]
    return out


def add_row(rows: Iterable[Row], name: str, weight: float = 1.0) -> list[Row]:
    """Append a row (enabled, weight 1); a name already in the stack is switched on instead."""
    rows = clean_rows(rows)
    for row in rows:
        if row["name"] == name:
            row["enabled"] = True
            return rows
    return rows + [{"name": name, "weight": float(weight), "enabled": True}]


def edit_row(rows: Iterable[Row], name: str, **changes: Any) -> list[Row]:
    """Set `weight` and/or `enabled` of one row."""
    return [{**r, **changes} if r["name"] == name else r for r in clean_rows(rows)]


def remove_row(rows: Iterable[Row], name: str) -> list[Row]:
    return [r for r in clean_rows(rows) if r["name"] != name]


def move_row(rows: Iterable[Row], name: str, delta: int) -> list[Row]:
    """Move a row up (-1) or down (+1); at either end nothing moves."""
    rows = clean_rows(rows)
    index = next((i for i, r in enumerate(rows) if r["name"] == name), None)
    if index is None or not 0 <= index + delta < len(rows):
        return rows
    rows[index], rows[index + delta] = rows[index + delta], rows[index]
    return rows


def add_word(prompt: str, word: str) -> str:
    """Add one trigger word to the prompt text, before a trailing run of tags; once only."""
    prompt = prompt or ""
    if word.strip().lower() in {p.strip().lower() for p in strip_tags(prompt).split(",")}:
        return prompt
    pos = len(prompt)
    for t in reversed(find_tags(prompt)):
        if prompt[t.end:pos].strip():
            break
        pos = t.start
    head, tail = prompt[:pos].rstrip(), prompt[pos:]
    sep = "" if not head else (" " if head.endswith(",") else ", ")
    return head + sep + word.strip() + (" " + tail.lstrip() if tail.strip() else "")
