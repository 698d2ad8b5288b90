"""The Preferences tab: every setting, when it applies, Save (validated) and Reset to defaults.

The panel edits the settings file, not the running session: it loads what is saved
(so values survive restarts), Save checks the whole set with Settings.replace before
anything is written, applies the changed fields that take effect without a restart to
the session, then writes the file atomically. Fields that need a restart stay at their
running values until then, and their help line says what runs now. Only the person at
this computer may change anything (ui/access.py); through the public link the panel is
read-only.

How refusals are shown: every bad value at its own control, in the words of its label
(ui/pref_checks.py), and once more in the result line; nothing vanishes with a toast.
Reset to defaults asks first, listing what it would change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from studio.errors import InputError, SettingsError
from studio.outputs import check_outputs_dir
from studio.session import Session
from studio.settings import Applies, Settings, SettingsFile, field_names, read_settings, save_settings, to_dict
from ui.access import ServerInfo, is_local
from ui.errors import engine_call
from ui.pref_checks import check_folders, labelled, problems, refusal
from ui.pref_fields import (APPLIES_BADGE, SECRET_FIELDS, describe_value, from_widget, info_for, make_widget, sections,
                            shown, to_widget, widget_info)
from ui.report_view import render_unpatch_costs

SERVED_CHECK_FIELDS = frozenset({"outputs_dir", "model", "vae", "model_dirs", "lora_dirs"})  # see check_served
READ_ONLY_NOTE = ("🔒 **Read-only through the public link.** Preferences can be changed only on the computer "
                  "running LoRA Studio.")


@dataclass
class PreferencesPanel:
    widgets: dict[str, gr.components.Component]  # field name -> widget
    errors: dict[str, gr.Markdown]  # field name -> what is wrong with its value (hidden when nothing)
    note: gr.Markdown  # "loaded from …": also the marker that the page load has finished
    unpatch_costs: gr.Markdown
    save: gr.Button
    reset: gr.Button
    result: gr.Markdown
    confirm: gr.Column  # "Reset every preference?" with Yes / Cancel
    confirm_text: gr.Markdown
    confirm_yes: gr.Button
    confirm_no: gr.Button


@dataclass
class Followers:
    """What else on the page shows a setting, refreshed when a save changes it."""

    by_field: dict[str, gr.components.Component] = field(default_factory=dict)  # e.g. default_steps -> Steps
    header: gr.Markdown | None = None  # the model line (device/precision)
    header_text: Callable[[], str] = lambda: ""


@dataclass(frozen=True)
class Change:
    name: str
    old: Any
    new: Any

    @property
    def applies(self) -> Applies:
        return info_for(self.name).applies

    def describe(self) -> str:
        old, new = (describe_value(self.name, v) for v in (self.old, self.new))
        return f"**{info_for(self.name).label}**: {old} → {new} ({APPLIES_BADGE[self.applies]})"

    def to_api(self) -> dict[str, Any]:
        """For /save_preferences and /reset_preferences: a secret says only whether it is set."""
        if self.name in SECRET_FIELDS:
            return {"from": describe_value(self.name, self.old), "to": describe_value(self.name, self.new),
                    "applies": self.applies.value}
        return {"from": to_widget(self.old), "to": to_widget(self.new), "applies": self.applies.value}


def check_served(session: Session, new: Settings) -> None:
    """The outputs folder is served to every visitor: it must be a folder of its own, holding none of
    the folders the app reads (studio/outputs.py); SettingsError says why not."""
    check_outputs_dir(new.outputs_dir, session.dirs, model=new.model, lora_dirs=new.lora_dirs,
                      model_dirs=new.model_dirs, vae=new.vae)


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
    if SERVED_CHECK_FIELDS & {c.name for c in changes}:
        check_served(session, new)
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
        saved = saved_settings(session)
        check_folders({n: v for n, v in changes.items() if v != to_widget_plain(saved, n)})
        return commit(session, saved.replace(**changes), touched=set(changes))


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


def pending_reset(session: Session) -> list[Change]:
    """What Reset to defaults would change (nothing is written)."""
    saved = saved_settings(session)
    return [Change(n, getattr(saved, n), getattr(Settings(), n)) for n in field_names()
            if getattr(saved, n) != getattr(Settings(), n)]


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


def running_values(session: Session, server: ServerInfo) -> dict[str, Any]:
    """What the running app uses: its settings, and the public link as it was started (`--share`)."""
    return {**{n: getattr(session.settings, n) for n in field_names()}, "share": server.credentials is not None}


def running_differences(session: Session, server: ServerInfo, saved: Settings) -> str:
    """Fields the running session uses with another value than the file (command line, pending restart)."""
    running = running_values(session, server)
    diffs = [f"{info_for(n).label} = {describe_value(n, running[n])}" for n in field_names()
             if running[n] != getattr(saved, n)]
    return ("Running now with: " + "; ".join(diffs) + " (from the command line, or saved but waiting for a "
            "restart).") if diffs else ""


def build_preferences(session: Session) -> PreferencesPanel:
    """Lay out the panel (call inside a gr.Tab); values arrive with the page load."""
    note = gr.Markdown("Loading preferences…", elem_id="prefs-note")
    with gr.Row():
        save = gr.Button("Save", variant="primary", elem_id="prefs-save")
        reset = gr.Button("Reset to defaults", elem_id="prefs-reset")
    with gr.Column(visible=False, variant="panel", elem_id="prefs-confirm") as confirm:  # a Group doubles its id
        confirm_text = gr.Markdown(elem_id="prefs-confirm-text")
        with gr.Row():
            confirm_yes = gr.Button("Yes, reset them", variant="stop", elem_id="prefs-confirm-yes")
            confirm_no = gr.Button("Cancel", elem_id="prefs-confirm-no")
    result = gr.Markdown(elem_id="prefs-result")
    widgets: dict[str, gr.components.Component] = {}
    errors: dict[str, gr.Markdown] = {}
    unpatch_costs = None
    for title, names in sections().items():
        with gr.Accordion(title, open=True):
            for pair in (names[i:i + 2] for i in range(0, len(names), 2)):
                with gr.Row(equal_height=False):
                    for name in pair:
                        with gr.Column(min_width=320):
                            widgets[name] = make_widget(name)
                            errors[name] = gr.Markdown(visible=False, elem_id=f"pref-error-{name}",
                                                       elem_classes="pref-error")
                            if name == "unpatch_lora_by_vram_offload":
                                unpatch_costs = gr.Markdown(render_unpatch_costs(session.history),
                                                            elem_id="unpatch-costs")
    if unpatch_costs is None:  # the field moved or went away: keep the readout anyway
        unpatch_costs = gr.Markdown(render_unpatch_costs(session.history), elem_id="unpatch-costs")
    return PreferencesPanel(widgets, errors, note, unpatch_costs, save, reset, result, confirm, confirm_text,
                            confirm_yes, confirm_no)


def panel_values(panel: PreferencesPanel, session: Session, server: ServerInfo, request: gr.Request | None) -> dict:
    """Every widget from the settings file; read-only for remote visitors. Used on page load and after Save."""
    local = is_local(request, server)
    file = saved_file(session)
    saved = file.settings
    running = running_values(session, server)
    out: dict = {}
    for name, widget in panel.widgets.items():
        now = describe_value(name, running[name], local) if running[name] != getattr(saved, name) else None
        out[widget] = gr.update(value=shown(name, to_widget(getattr(saved, name)), local), interactive=local,
                                info=widget_info(name, now))
    for name in SECRET_FIELDS & panel.widgets.keys():  # never sent; the box says whether one is saved
        out[panel.widgets[name]]["placeholder"] = ("saved (never shown): type a new one to replace it"
                                                   if getattr(saved, name) else "none saved")
    where = f"Loaded from `{session.dirs.settings_file}`." if local else READ_ONLY_NOTE
    extra = running_differences(session, server, saved) if local else ""
    if local and file.fallbacks:
        extra = "\n\n".join(filter(None, [extra, "⚠ Not used from the file (fix them here, or in the file): "
                                             + "; ".join(file.warnings()) + "."]))
    out[panel.note] = where + (f"\n\n{extra}" if extra else "")
    out[panel.unpatch_costs] = render_unpatch_costs(list(session.history))
    out[panel.save] = gr.update(interactive=local)
    out[panel.reset] = gr.update(interactive=local)
    return out


def _errors_shown(panel: PreferencesPanel, found: dict[str, str]) -> dict:
    return {box: gr.update(value=found.get(name, ""), visible=name in found) for name, box in panel.errors.items()}


def wire_preferences(panel: PreferencesPanel, session: Session, server: ServerInfo,
                     followers: Followers | None = None) -> None:
    followers = followers or Followers()
    follow_outputs = [*followers.by_field.values(), *([followers.header] if followers.header else [])]
    outputs = [*panel.widgets.values(), *panel.errors.values(), panel.note, panel.unpatch_costs, panel.save,
               panel.reset, panel.result, panel.confirm, *follow_outputs]
    by_widget = {widget: name for name, widget in panel.widgets.items()}

    def followed(changes: list[Change]) -> dict:
        """The Generate tab's defaults and the header show what was just applied, without a reload."""
        out: dict = {widget: (getattr(session.settings, name) if any(c.name == name for c in changes)
                              else gr.skip()) for name, widget in followers.by_field.items()}
        if followers.header is not None:
            out[followers.header] = followers.header_text()
        return out

    def after(changes: list[Change], verb: str, request: gr.Request) -> dict:
        return {**panel_values(panel, session, server, request), **_errors_shown(panel, {}),
                panel.result: report_changes(changes, verb), panel.confirm: gr.update(visible=False),
                **followed(changes)}

    def save_panel(values: dict, request: gr.Request) -> dict:
        _require_local(server, request)
        changes = {by_widget[w]: from_widget(by_widget[w], v) for w, v in values.items() if w in by_widget}
        with engine_call():
            _require_local(server, request)
        changes = {by_widget[w]: from_widget(by_widget[w], v) for w, v in values.items() if w in by_widget}
        saved = saved_settings(session)
        changed = edited(saved, changes)
        found = problems(saved, changed)
        if not found and SERVED_CHECK_FIELDS & changed.keys():
            try:
                check_served(session, saved.replace(**changed))
            except SettingsError as err:
                found["outputs_dir"] = labelled(str(err))
        if found:
            return {**{c: gr.skip() for c in outputs}, **_errors_shown(panel, found), panel.result: refusal(found)}
        return after(save_changes(session, server, changed, request), "Saved", request)

    def ask_reset(request: gr.Request) -> dict:
        with engine_call():
            _require_local(server, request)
        pending = pending_reset(session)
        if not pending:
            return {c: gr.skip() for c in outputs} | {panel.result: "Reset: every preference is already at its "
                                                                     "default; nothing to do."}
        text = (f"**Reset {len(pending)} preference{'s' if len(pending) != 1 else ''} to the defaults?** "
                "This is what would change:\n\n" + "\n".join(f"- {c.describe()}" for c in pending))
        return {c: gr.skip() for c in outputs} | {panel.confirm: gr.update(visible=True), panel.confirm_text: text}

    def reset_panel(request: gr.Request) -> dict:
        return after(reset_to_defaults(session, server, request), "Reset", request)

    # queued (not queue=False): applying waits for a running generation, and the queue shows that it waits
    queued: dict[str, Any] = {"api_visibility": "private", "concurrency_id": "preferences",
                              "show_progress_on": [panel.result]}
    panel.save.click(save_panel, set(panel.widgets.values()), outputs, **queued)
    panel.reset.click(ask_reset, None, [*outputs, panel.confirm_text], api_visibility="private", queue=False,
                      show_progress="hidden")
    panel.confirm_yes.click(reset_panel, None, outputs, **queued)
    panel.confirm_no.click(lambda: (gr.update(visible=False), "Reset cancelled: nothing changed."), None,
                           [panel.confirm, panel.result], api_visibility="private", queue=False,
                           show_progress="hidden")

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


def to_widget_plain(saved: Settings, name: str) -> Any:
    """The saved value in the form `from_widget` gives (lists for folder lists, plain values otherwise)."""
    return from_widget(name, to_widget(getattr(saved, name)))
