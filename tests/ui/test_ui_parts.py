"""The UI's pure parts, without a server: forms, sizes, report rendering, tickets, access, fields."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from studio.errors import SettingsError
from studio.infotext import Infotext
from studio.report import Report
from studio.request import MAX_SEED
from ui.access import ServerInfo, host_is_local, is_local
from ui.generate_tab import GenerateForm
from ui.jobs import JobBook
from ui.png_info import restorable
from ui.pref_fields import HIDDEN_PATH, describe_value, from_widget, sections, shown, to_widget
from ui.charts import memory_chart, phase_chart
from ui.report_view import PHASE_LABELS, render_memory, render_report, render_unpatch_costs, unpatch_costs
from ui.share import Credentials, LinkState, PublicLink, login_for
from ui.sizes import CUSTOM, SDXL_BUCKETS, preset_for, size_presets
from studio.settings import Settings, field_names


def _report(seed: int = 1, lora: dict | None = None, cuda: bool = False) -> Report:
    memory = {"peak_rss": 600 * 2**20, "rss": 590 * 2**20}
    if cuda:
        memory |= {"cuda_peak_allocated": 3 * 2**30, "cuda_peak_reserved": 4 * 2**30}
    return Report(request={"seed": seed, "width": 128, "height": 128, "sampler": "Euler", "cfg": 5.0},
                  model={"name": "tiny", "demo": True, "hash": "abc"}, device="cpu", dtype="bfloat16",
                  phases={"text_encode": 0.01, "denoise": 0.2, "vae_decode": 0.05, "save": 0.01, "total": 0.27},
                  step_seconds=[0.1, 0.1], memory=memory, lora=lora or {})


def test_a_batch_counts_up_from_one_base_seed_and_wraps():
    requests = GenerateForm(prompt="x", seed=MAX_SEED - 1, steps=2, batch_count=3).requests()
    assert [r.seed for r in requests] == [MAX_SEED - 1, MAX_SEED, 0]
    randoms = GenerateForm(prompt="x", seed=-1, batch_count=2).requests()
    assert randoms[1].seed == (randoms[0].seed + 1) % (MAX_SEED + 1)
    assert GenerateForm(prompt="a <lora:x:0.5>").requests()[0].prompt == "a <lora:x:0.5>"  # the session reads tags


@pytest.mark.parametrize("form, message", [(GenerateForm(prompt="x", batch_count=0), "batch count"),
                                           (GenerateForm(prompt="x", width=100), "multiple of 8"),
                                           (GenerateForm(prompt="x", sampler="Heun"), "sampler")])
def test_bad_forms_are_refused_with_the_field_named(form, message):
    with pytest.raises(SettingsError, match=message):
        form.requests()


def test_size_presets_cover_the_sdxl_buckets_and_a_demo_scale():
    full = size_presets(1024)
    assert sorted(full.values()) == sorted(SDXL_BUCKETS)
    demo = size_presets(256)
    assert (256, 256) in demo.values() and (384, 160) in demo.values() and (1024, 1024) in demo.values()
    assert all(w % 8 == 0 and h % 8 == 0 for w, h in demo.values())
    assert preset_for(demo, 288, 224).startswith("288×224 (9:7") and preset_for(demo, 200, 200) == CUSTOM


def test_the_report_says_why_this_precision_and_what_the_model_load_was():
    report = _report()
    assert "Precision" not in render_report(report) and "Model load" not in render_report(report)  # older reports
    report.dtype_reason = "fp32: no native bf16 on this CPU (AVX2), probe bf16 60x slower than fp32"
    report.phases = {"model_load": 3.5, **report.phases}
    report.model = {**report.model, "load_parts": {"imports": 2.5, "read_build": 0.8, "hash": 0.01,
                                                   "placement": 0.15, "lora_bind": 0.04}}
    text = render_report(report)
    assert "Precision: fp32: no native bf16 on this CPU (AVX2), probe bf16 60x slower than fp32" in text
    assert ("Model load: imports 2.50 s · read + build 0.80 s · hash 0.01 s · placement + pristine copies 0.15 s"
            " · LoRA bind 0.04 s") in text
    assert "model_load: imports 2.50 s" in report.summary() and "precision fp32: no native" in report.summary()


def test_report_table_frames_and_unpatch_costs():
    text = render_report(_report(cuda=True))
    assert "| denoise | 0.200 s | 74 % |" in text and "peak VRAM allocated" in text
    history = [_report(1), _report(2, cuda=True)]
    assert "not measured yet" in render_unpatch_costs(history)
    lora = {"unpatch": {"method": "restore_in_place", "tensors": 4, "switch_seconds": 0.0123}, "stack": [
        {"name": "warm", "hash": "h", "weight": 0.8, "format": "kohya", "layers": 9, "unmatched_keys": 2,
         "unmatched_examples": ["k1", "k2"], "cache": "miss"}]}
    history.append(_report(3, lora=lora))
    history.append(_report(4, lora={"unpatch": {"method": "none", "tensors": 0, "switch_seconds": 0.0}}))
    assert unpatch_costs(history) == {"restore_in_place": (0.0123, 3)}
    assert "restore in place: **12.3 ms** (generation #3)" in render_unpatch_costs(history)
    assert "| warm (`h`) | 0.8 | kohya | 9 | 2: `k1`, `k2` | miss |" in render_report(history[2])


def _bars(svg: str) -> dict[str, float]:
    """generation -> the drawn height of its whole bar, read back from the SVG."""
    found = re.findall(r'class="run-bar" data-generation="(#\d+)" x="[\d.]+" y="[\d.]+" width="[\d.]+" '
                       r'height="([\d.]+)"', svg)
    return {label: float(h) for label, h in found}


def test_a_fast_run_stays_visible_next_to_a_model_load_on_the_log_time_axis():
    slow = _report(1)
    slow.phases = {"model_load": 6.0, "denoise": 0.2, "vae_decode": 0.05, "total": 6.3}
    fast = [_report(i) for i in range(2, 5)]  # 0.27 s each
    svg = phase_chart([slow, *fast], PHASE_LABELS)
    bars = _bars(svg)
    assert set(bars) == {"#1", "#2", "#3", "#4"}
    assert bars["#2"] > 0.2 * bars["#1"]  # on the old linear axis: 0.27 / 6.3 = 4 % of it
    assert ">0.1 s<" in svg and ">10 s<" in svg  # decade ticks
    assert 'data-phase="model_load"' in svg and "model load: 6 s (96 %)" in svg  # each phase's share, on hover
    assert "No generation yet" in phase_chart([], PHASE_LABELS)


def test_the_memory_chart_marks_a_single_run_and_starts_at_zero():
    one = memory_chart([_report(1)])
    assert one.count('class="memory-point"') == 1 and "<polyline" not in one  # a line needs two points
    assert ">0 MB<" in one and ">700 MB<" in one  # 600 MB peak: from zero to a round number above it
    two = memory_chart([_report(1), _report(2, cuda=True)])
    assert two.count('data-measure="peak RAM"') == 2 and two.count('data-measure="peak VRAM"') == 1
    assert ">4,000 MB<" in two  # the VRAM peak of 3,072 MB sets the top


def test_the_memory_table_shows_the_mode_where_each_component_is_and_what_moved():
    mem = {"mode": "offload", "mode_requested": "auto", "notes": ["VRAM budget fits the UNet alone"],
           "components": {"unet": {"where": "cuda", "bytes": 5 * 2**30, "device_bytes": 5 * 2**30, "on_demand": True},
                          "vae": {"where": "cpu", "bytes": 3 * 2**20 // 2, "device_bytes": 0, "on_demand": True}},
           "pinned_bytes": 2 * 2**30, "cache_ram_bytes": 7 * 2**30, "lora_cache_bytes": 228 * 2**20,
           "h2d_bytes": 5 * 2**30, "rss": 9 * 2**30, "peak_rss": 10 * 2**30, "cuda_peak_allocated": 6 * 2**30,
           "cuda_peak_reserved": 7 * 2**30, "stream": {"lookahead": 4, "reserved_bytes": 300 * 2**20}}
    text = "\n".join(render_memory(mem))
    assert "Memory mode **offload** (asked: auto) · VRAM budget fits the UNet alone" in text
    assert "| unet | 5,120 MB | cuda (moved in for its phase) | 5,120 MB |" in text
    assert "| vae | 1.5 MB | cpu (moved in for its phase) | 0 MB |" in text
    for row in ("| pinned RAM | 2,048 MB |", "| LoRA cache | 228 MB |", "| copied host → device | 5,120 MB |",
                "| peak VRAM reserved | 7,168 MB |", "| stream buffers (lookahead 4) | 300 MB |"):
        assert row in text
    # what an old report (or a bare RSS reading) has: just the two RAM rows, no empty ones
    bare = render_memory({"peak_rss": 600 * 2**20, "rss": 590 * 2**20})
    assert bare[-2:] == ["| peak RAM (RSS) | 600 MB |", "| RAM after (RSS) | 590 MB |"] and len(bare) == 4


def test_stop_reaches_queued_and_running_tickets_of_one_owner_only():
    book = JobBook()
    queued = book.reserve("tab-a")
    other = book.reserve("tab-b")
    with book.hold("tab-a", None) as running:
        assert book.stop("tab-a").__dict__ == {"running": 1, "queued": 1}
        assert running.cancelled
    with book.hold("tab-a", queued) as token:
        assert token.cancelled  # stopped while it waited in the queue: it ends at once
    with book.hold("tab-b", other) as token:
        assert not token.cancelled
    with book.hold("tab-b", queued) as token:  # someone else's ticket id gives a fresh token
        assert not token.cancelled
    assert book.active() == 0


def test_a_stop_holds_for_a_job_accepted_before_it_that_has_no_ticket_yet():
    """An API job gets its ticket when it starts; a Stop sent while it waited must still stop it (issue 11)."""
    import time

    book = JobBook()
    accepted = time.monotonic()
    assert book.stop("client-a").__dict__ == {"running": 0, "queued": 0}  # nothing holds a ticket yet
    with book.hold("client-a", None, accepted_at=accepted) as token:
        assert token.cancelled  # accepted before the Stop: ends at once
    with book.hold("client-b", None, accepted_at=accepted) as token:
        assert not token.cancelled  # another owner's Stop
    with book.hold("client-a", None, accepted_at=time.monotonic()) as token:
        assert not token.cancelled  # accepted after the Stop: a new job runs


@pytest.mark.parametrize("host, port, local", [
    ("127.0.0.1:7860", 7860, True), ("localhost:7860", 7860, True), ("[::1]:7860", 7860, True),
    ("127.0.0.1:7861", 7860, False), ("abcd.gradio.live", 7860, False), ("192.168.1.5:7860", 7860, False),
    ("", 7860, False), (None, 7860, False), ("localhost:7860", None, True), ("evil.com:7860", None, False)])
def test_only_a_loopback_host_with_our_port_is_local(host, port, local):
    assert host_is_local(host, port) is local
    request = SimpleNamespace(headers={"host": host} if host is not None else {})
    assert is_local(request, ServerInfo(port=port)) is local


def test_secrets_stay_local_and_the_public_link_describes_itself():
    # never sent, not even to "local" (a Host header a proxy may rewrite): issue 11
    assert shown("auth_password", "hunter2", local=False) == shown("auth_password", "hunter2", local=True) == ""
    assert describe_value("auth_password", "hunter2") == "(set)" and describe_value("auth_password", "") == "(empty)"
    assert shown("outputs_dir", "/home/me/images", local=True) == "/home/me/images"
    assert shown("outputs_dir", "/home/me/images", local=False) == HIDDEN_PATH and shown("model", "", False) == ""
    creds = login_for(Settings())
    assert creds.generated and len(creds.password) >= 12 and creds.user == "studio"
    assert login_for(Settings(auth_password="pw")) == Credentials("studio", "pw", generated=False)
    link = PublicLink()
    assert "off" in link.describe(creds, local=True)
    link.state, link.reason = LinkState.FAILED, "no internet connection: the public link could not be created"
    assert creds.password in link.describe(creds, local=True)
    assert creds.password not in link.describe(creds, local=False)
    assert "no internet connection" in link.describe(creds, local=False)


def test_every_setting_has_a_widget_and_values_round_trip():
    placed = [n for names in sections().values() for n in names]
    assert sorted(placed) == sorted(field_names())
    defaults = Settings()
    for name in field_names():
        assert Settings().replace(**{name: from_widget(name, to_widget(getattr(defaults, name)))}) == defaults
    assert from_widget("lora_dirs", " /a \n\n/b ") == ["/a", "/b"]
    assert from_widget("default_steps", 7.0) == 7


def test_png_parameters_restore_what_fits_and_name_what_does_not():
    info = Infotext("a <lora:warm:0.5> cat", "blurry", {"Steps": "30", "Seed": "42", "CFG scale": "6.5",
                                                          "Sampler": "DPM++ 2M SDE", "Size": "832x1216"})
    values, skipped = restorable(info)
    assert values == {"seed": 42, "steps": 30, "cfg": 6.5, "width": 832, "height": 1216}
    assert len(skipped) == 1 and "DPM++ 2M SDE" in skipped[0]
    _, skipped = restorable(Infotext("x", "", {"Size": "4096x100", "Steps": "many"}))
    assert len(skipped) == 2
