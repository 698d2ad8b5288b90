"""The Preferences tab: every setting, when it applies, Save (validated) and Reset to defaults.

The panel edits the settings file, not the running session: it loads what is saved
(so values survive restarts), Save checks the whole set with Settings.replace before
anything is written, applies the changed fields that take effect without a restart to
the session, then writes the file atomically. Fields that need a restart stay at their
running values until then. Only the person at this computer may change anything
(ui/access.py); through the public link the panel is read-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from studio.errors import InputError, SettingsError
from studio.outputs import check_outputs_dir
from studio.session import Session
from studio.settings import Applies, Settings, SettingsFile, field_names, read_settings, save_settings, to_dict
from ui.access import ServerInfo, is_local
from ui.errors import engine_call
from ui.pref_fields import (APPLIES_BADGE, SECRET_FIELDS, described, from_widget, info_for, make_widget, sections,
                             shown, to_widget)
from ui.report_view import render_unpatch_costs

READ_ONLY_NOTE = ("🔒 **Read-only through the public link.** Preferences can be changed only on the computer "
                  "running LoRA Studio.")


@dataclass
class PreferencesPanel:
    widgets: dict[str, gr.components.Component]  # field name -> widget
    note: gr.Markdown  # "loaded from …": also the marker that the page load has finished
    unpatch_costs: gr.Markdown
    save: gr.Button
    reset: gr.Button
    result: gr.Markdown


@dataclass(frozen=True)
class Change:
    name: str
    old: Any
    new: Any

    @property
    def applies(self) -> Applies:
        return info_for(self.name).applies

    def describe(self) -> str:
        old, new = described(self.name, self.old), described(self.name, self.new)
        return f"**{info_for(self.name).label}**: {old} → {new} ({APPLIES_BADGE[self.applies]})"

    def to_api(self) -> dict[str, Any]:
        """For /save_preferences and /reset_preferences: a secret says only whether it is set."""
        if self.name in SECRET_FIELDS:
            return {"from": described(self.name, self.old), "to": described(self.name, self.new),
                    "applies": self.applies.value}
        return {"from": to_widget(self.old), "to": to_widget(self.new), "applies": self.applies.value}


def saved_file(session: Session) -> SettingsFile:
    """What the settings file holds (defaults when there is none yet), and which values fell back."""
    return read_settings(session.dirs.settings_file, warn=False)  # warned once, at start


def saved_settings(session: Session) -> Settings:
    return saved_file(session).settings


def commit(session: Session, new: Settings, touched: set[str]) -> list[Change]:
    """Apply what changed (except restart-only fields) to the session, then write the file.

    The session goes first: apply_settings raises before changing anything, so a value
    the engine refuses (cuda without a GPU) is never saved either. A value of the file that
    fell back to its default is written back as it was unless `touched` names its field: a
    Save never writes a default the user did not choose (issue 11).
    """
    file = saved_file(session)
    old = file.settings
    keep_raw = {name: fallback.raw for name, fallback in file.fallbacks.items() if name not in touched}
    changes = [Change(n, getattr(old, n), getattr(new, n)) for n in field_names() if getattr(old, n) != getattr(new, n)]
    if {"outputs_dir", "lora_dirs", "model"} & {c.name for c in changes}:
        # the outputs folder is served to every visitor: a folder of its own (studio/outputs.py)
        check_outputs_dir(new.outputs_dir, session.dirs, model=new.model, lora_dirs=new.lora_dirs)
    live = {c.name: to_dict(new)[c.name] for c in changes if c.applies is not Applies.RESTART}
    if live:
        session.apply_settings(session.settings.replace(**live))
    try:
        save_settings(new, session.dirs.settings_file, keep_raw=keep_raw)
    except OSError as err:
        raise SettingsError(f"could not write {session.dirs.settings_file} ({err.strerror or err})") from None
    return changes


def save_changes(session: Session, server: ServerInfo, changes: dict[str, Any],
                 request: gr.Request | None) -> list[Change]:
    """Validate `changes` against the saved settings and commit them; nothing is saved on error."""
    with engine_call():
        _require_local(server, request)
        unknown = sorted(set(changes) - set(field_names()))
        if unknown:
            raise SettingsError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(field_names())}")
        return commit(session, saved_settings(session).replace(**changes), touched=set(changes))


def reset_to_defaults(session: Session, server: ServerInfo, request: gr.Request | None) -> list[Change]:
    with engine_call():
        _require_local(server, request)
        return commit(session, Settings(extra=saved_settings(session).extra), touched=set(field_names()))


def edited(saved: Settings, values: dict[str, Any]) -> dict[str, Any]:
    """The panel sends every widget: keep the fields whose value differs from the file's (a value
    that cannot be read counts as edited, so Save names what is wrong with it). An empty secret
    box keeps the saved secret: the panel never receives it, so it cannot send it back."""
    out = {}
    for name, value in values.items():
        if name in SECRET_FIELDS and not value:
            continue
        try:
            same = getattr(saved.replace(**{name: value}), name) == getattr(saved, name)
        except SettingsError:
            same = False
        if not same:
            out[name] = value
    return out


def _require_local(server: ServerInfo, request: gr.Request | None) -> None:
    if not is_local(request, server):
        raise InputError("Preferences are read-only through the public link; change them on the computer running "
                         "LoRA Studio.")


def report_changes(changes: list[Change], verb: str) -> str:
    if not changes:
        return f"{verb}: nothing changed."
    restart = any(c.applies is Applies.RESTART for c in changes)
    lines = [f"{verb}: {len(changes)} change{'s' if len(changes) != 1 else ''}.", "",
             *(f"- {c.describe()}" for c in changes)]
    if restart:
        lines += ["", "Restart LoRA Studio for the changes marked ⚙ to take effect."]
    return "\n".join(lines)


def running_differences(session: Session, saved: Settings) -> str:
    """Fields the running session uses with another value than the file (command line, pending restart)."""
    diffs = [f"{info_for(n).label} = {described(n, getattr(session.settings, n))}"
             for n in field_names() if getattr(session.settings, n) != getattr(saved, n)]
    return ("Running now with: " + "; ".join(diffs) + " (from the command line, or saved but waiting for a "
            "restart).") if diffs else ""


def build_preferences(session: Session) -> PreferencesPanel:
    """Lay out the panel (call inside a gr.Tab); values arrive with the page load."""
    note = gr.Markdown("Loading preferences…", elem_id="prefs-note")
    with gr.Row():
        save = gr.Button("Save", variant="primary", elem_id="prefs-save")
        reset = gr.Button("Reset to defaults", elem_id="prefs-reset")
    result = gr.Markdown(elem_id="prefs-result")
    widgets: dict[str, gr.components.Component] = {}
    unpatch_costs = None
    for title, names in sections().items():
        with gr.Accordion(title, open=True):
            for pair in (names[i:i + 2] for i in range(0, len(names), 2)):
                with gr.Row(equal_height=False):
                    for name in pair:
                        with gr.Column(min_width=320):
                            widgets[name] = make_widget(name)
                            if name == "unpatch_lora_by_vram_offload":
                                unpatch_costs = gr.Markdown(render_unpatch_costs(session.history),
                                                            elem_id="unpatch-costs")
    if unpatch_costs is None:  # the field moved or went away: keep the readout anyway
        unpatch_costs = gr.Markdown(render_unpatch_costs(session.history), elem_id="unpatch-costs")
    return PreferencesPanel(widgets, note, unpatch_costs, save, reset, result)


def panel_values(panel: PreferencesPanel, session: Session, server: ServerInfo, request: gr.Request | None) -> dict:
    """Every widget from the settings file; read-only for remote visitors. Used on page load and after Save."""
    local = is_local(request, server)
    file = saved_file(session)
    saved = file.settings
    out: dict = {widget: gr.update(value=shown(name, to_widget(getattr(saved, name)), local), interactive=local)
                 for name, widget in panel.widgets.items()}
    for name in SECRET_FIELDS & panel.widgets.keys():  # never sent; the box says whether one is saved
        saved_one = bool(getattr(saved, name))
        out[panel.widgets[name]] = gr.update(value="", interactive=local, placeholder=(
            "saved (never shown): type a new one to replace it" if saved_one else "none saved"))
    where = f"Loaded from `{session.dirs.settings_file}`." if local else READ_ONLY_NOTE
    extra = running_differences(session, saved) if local else ""
    if local and file.fallbacks:
        extra = "\n\n".join(filter(None, [extra, "⚠ Not used from the file (fix them here, or in the file): "
                                             + "; ".join(file.warnings()) + "."]))
    out[panel.note] = where + (f"\n\n{extra}" if extra else "")
    out[panel.unpatch_costs] = render_unpatch_costs(list(session.history))
    out[panel.save] = gr.update(interactive=local)
    out[panel.reset] = gr.update(interactive=local)
    return out


def wire_preferences(panel: PreferencesPanel, session: Session, server: ServerInfo) -> None:
    outputs = [*panel.widgets.values(), panel.note, panel.unpatch_costs, panel.save, panel.reset, panel.result]
    by_widget = {widget: name for name, widget in panel.widgets.items()}

    def save_panel(values: dict, request: gr.Request) -> dict:
        changes = {by_widget[w]: from_widget(by_widget[w], v) for w, v in values.items() if w in by_widget}
        done = save_changes(session, server, edited(saved_settings(session), changes), request)
        return {**panel_values(panel, session, server, request), panel.result: report_changes(done, "Saved")}

    def reset_panel(request: gr.Request) -> dict:
        changes = reset_to_defaults(session, server, request)
        return {**panel_values(panel, session, server, request), panel.result: report_changes(changes, "Reset")}

    # queued (not queue=False): applying waits for a running generation, and the queue shows that it waits
    panel.save.click(save_panel, set(panel.widgets.values()), outputs, api_visibility="private",
                     concurrency_id="preferences", show_progress_on=[panel.result])
    panel.reset.click(reset_panel, None, outputs, api_visibility="private", concurrency_id="preferences",
                      show_progress_on=[panel.result])

    def save_preferences(changes: dict, request: gr.Request) -> dict:
        """Change settings by name, e.g. {"default_steps": 30}; invalid values are refused and nothing is saved."""
        done = save_changes(session, server, changes, request)
        return {"changed": {c.name: c.to_api() for c in done}}

    def reset_preferences(request: gr.Request) -> dict:
        """Put every setting back to its default; returns what changed."""
        done = reset_to_defaults(session, server, request)
        return {"changed": {c.name: c.to_api() for c in done}}

    def preferences(request: gr.Request) -> dict:
        """The saved settings, each with when a change applies. A secret is never returned (`set` says
        whether one is saved); local paths only to this computer."""
        local = is_local(request, server)
        saved = to_dict(saved_settings(session))
        out = {name: {"value": shown(name, saved[name], local), "applies": info_for(name).applies.value}
               for name in field_names()}
        for name in SECRET_FIELDS & out.keys():
            out[name]["set"] = bool(saved[name])
        return out

    gr.api(save_preferences, api_name="save_preferences", concurrency_id="preferences")
    gr.api(reset_preferences, api_name="reset_preferences", concurrency_id="preferences")
    gr.api(preferences, api_name="preferences", queue=False)
