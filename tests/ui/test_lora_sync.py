"""Rows <-> `<lora:name:weight>` tags: the pure rules the LoRA panel and Generate rely on."""

from __future__ import annotations

import pytest

from studio.infotext import split_lora_tags
from ui.generate_tab import GenerateForm
from ui.lora_sync import (add_row, add_word, edit_row, fmt, move_row, prompt_from_rows, remove_row, rows_from_prompt,
                          stack_of, strip_tags)


def row(name: str, weight: float = 1.0, enabled: bool = True, options: str = "") -> dict:
    return {"name": name, "weight": weight, "enabled": enabled, **({"options": options} if options else {})}


@pytest.mark.parametrize("weight, text", [(1.0, "1"), (0.75, "0.75"), (-0.5, "-0.5"), (0.7000000000000001, "0.7"),
                                          (0.05 * 3, "0.15"), (2, "2")])
def test_weights_are_written_short(weight, text):
    assert fmt(weight) == text


def test_rows_to_prompt_appends_new_tags_and_keeps_the_text_in_place():
    assert prompt_from_rows("", [row("a")]) == "<lora:a:1>"
    assert prompt_from_rows("a cat", [row("a", 0.75), row("b", -0.5)]) == "a cat <lora:a:0.75> <lora:b:-0.5>"
    assert prompt_from_rows("a cat\n", [row("a")]) == "a cat\n<lora:a:1>"


def test_rows_to_prompt_rewrites_only_what_changed_in_place():
    prompt = "portrait, <lora:a:0.70> soft light, <lora:b:1:0.5> film"
    b = row("b", options="unet=0.5")  # the tag's second number is its UNet weight (A1111's te:unet)
    assert rows_from_prompt(prompt, []) == [row("a", 0.7), b]
    assert prompt_from_rows(prompt, [row("a", 0.7), b]) == prompt  # same weights: byte for byte
    assert prompt_from_rows(prompt, [row("a", 0.75), b]) == \
        "portrait, <lora:a:0.75> soft light, <lora:b:1:0.5> film"
    assert prompt_from_rows(prompt, [row("a", 0.7), row("b")]) == "portrait, <lora:a:0.70> soft light, <lora:b:1> film"


def test_disabled_and_removed_rows_lose_their_tag_and_one_space():
    prompt = "<lora:a:1> a cat <lora:b:0.5> on a mat <lora:c:1>"
    assert prompt_from_rows(prompt, [row("a", enabled=False), row("b", 0.5), row("c")]) == \
        "a cat <lora:b:0.5> on a mat <lora:c:1>"
    assert prompt_from_rows(prompt, [row("a"), row("c")]) == "<lora:a:1> a cat on a mat <lora:c:1>"
    assert prompt_from_rows(prompt, []) == "a cat on a mat"
    assert prompt_from_rows("x <lora:a:1> <lora:b:1> y", []) == "x y"


def test_a_duplicate_tag_keeps_its_first_place_and_the_rows_weight():
    prompt = "<lora:a:0.5> a cat <lora:a:0.8>"
    rows = rows_from_prompt(prompt, [])
    assert rows == [row("a", 0.8)]  # the last mention's weight, as the session does
    assert prompt_from_rows(prompt, rows) == "<lora:a:0.8> a cat"


def test_moving_rows_swaps_the_tags_places():
    prompt = "x <lora:a:1> y <lora:b:0.5> z"
    rows = move_row([row("a"), row("b", 0.5)], "b", -1)
    assert [r["name"] for r in rows] == ["b", "a"]
    assert prompt_from_rows(prompt, rows) == "x <lora:b:0.5> y <lora:a:1> z"
    assert move_row(rows, "b", -1) == rows and move_row(rows, "a", +1) == rows  # the ends stay put


def test_prompt_to_rows_adds_removes_and_reweights():
    rows = [row("a"), row("b", 0.5), row("off", 0.3, enabled=False)]
    edited = rows_from_prompt("a cat <lora:b:-0.5> <lora:new:0.75>", rows)
    assert edited == [row("b", -0.5), row("off", 0.3, enabled=False), row("new", 0.75)]
    assert rows_from_prompt("<lora:off:1.5>", edited) == [row("off", 1.5)]  # typing a disabled row's tag turns it on


def test_unknown_names_keep_their_tag_and_become_rows():
    rows = rows_from_prompt("a cat <lora:not-here:1>", [])
    assert rows == [row("not-here")]
    assert prompt_from_rows("a cat <lora:not-here:1>", rows) == "a cat <lora:not-here:1>"


def test_the_two_directions_reach_a_fixed_point():
    prompt = "<lora:b:0.5> sunset, <lora:a:1> beach <lora:b:0.9> <lora:c:1.25>"
    rows = rows_from_prompt(prompt, [row("a"), row("b")])
    tidy = prompt_from_rows(prompt, rows)
    assert rows_from_prompt(tidy, rows) == rows and prompt_from_rows(tidy, rows) == tidy
    assert [r["name"] for r in rows] == ["b", "a", "c"]


def test_the_generate_form_sends_text_without_tags_and_the_enabled_rows():
    rows = [row("a", 0.75), row("b", enabled=False)]
    form = GenerateForm.from_ui("a cat <lora:a:0.75>, at night", rows, steps=2)
    assert form.prompt == "a cat , at night" == split_lora_tags("a cat <lora:a:0.75>, at night")[0]
    assert form.loras == (("a", 0.75),)
    # a tag typed just before Generate counts even if the rows have not caught up yet
    assert GenerateForm.from_ui("a cat <lora:a:0.5> <lora:c:1>", rows).loras == (("a", 0.5), ("c", 1.0))
    assert GenerateForm.from_ui("<lora:x:0.2> dog", None).loras == (("x", 0.2),)  # an API caller has no rows
    assert strip_tags("a  <lora:x:1>  b") == "a b"


def test_row_edits_are_by_name():
    rows = add_row([], "a")
    assert add_row(rows, "a") == rows  # once only
    assert add_row(edit_row(rows, "a", enabled=False), "a") == [row("a")]  # re-adding switches it on
    assert edit_row(rows, "a", weight=-1.25) == [row("a", -1.25)]
    assert remove_row(rows + [row("b")], "a") == [row("b")]
    assert stack_of([row("a", 0.5), row("b", enabled=False), {"bad": 1}, row("a", 2)]) == (("a", 0.5),)


@pytest.mark.parametrize("prompt, expected", [
    ("", "warm light"),
    ("a cat", "a cat, warm light"),
    ("a cat,", "a cat, warm light"),
    ("a cat <lora:w:1>", "a cat, warm light <lora:w:1>"),
    ("<lora:w:1>", "warm light <lora:w:1>"),
    ("a cat <lora:w:1> in a hat", "a cat <lora:w:1> in a hat, warm light"),
    ("a cat, Warm Light <lora:w:1>", "a cat, Warm Light <lora:w:1>"),  # already there: once is enough
])
def test_a_trigger_word_goes_before_the_trailing_tags_once(prompt, expected):
    assert add_word(prompt, "warm light") == expected


def test_block_weights_and_step_ranges_ride_along_with_their_row():
    prompt = "a cat <lora:a:0.8:lbw=OUTD:stop=10> at night"
    rows = rows_from_prompt(prompt, [])
    assert rows == [row("a", 0.8, options="lbw=OUTD:stop=10")]
    assert stack_of(rows) == (("a", 0.8, "lbw=OUTD:stop=10"),)
    assert prompt_from_rows(prompt, rows) == prompt
    moved = edit_row(rows, "a", options="lbw=1,0,0,0,0,0.5,1,1,1,0,0,0:stop=10")
    assert prompt_from_rows(prompt, moved) == "a cat <lora:a:0.8:lbw=1,0,0,0,0,0.5,1,1,1,0,0,0:stop=10> at night"
    scrub = edit_row(rows, "a", scrub=True, preview_steps=4)
    assert rows_from_prompt("<lora:a:0.5:lbw=OUTD:stop=10>", scrub)[0]["scrub"]  # UI keys stay with the row
    assert prompt_from_rows("", scrub) == "<lora:a:0.8:lbw=OUTD:stop=10>"  # and never reach the tag


def test_a_half_typed_tag_is_left_alone_until_generate():
    assert rows_from_prompt("a cat <lora:a:0.", []) == []
    assert rows_from_prompt("a cat <lora:a:nan>", []) == []
    with pytest.raises(Exception, match="nan"):
        split_lora_tags("a cat <lora:a:nan>")


def test_block_sliders_keep_the_layout_they_show():
    from ui.lora_blocks import block_view, set_block

    kohya = [row("k")]
    assert len(block_view(kohya[0], {})[1]) == 12
    moved = set_block(kohya, "k", 5, 0.5, {})  # MID of 12
    assert moved[0]["options"] == "lbw=1,1,1,1,1,0.5,1,1,1,1,1,1"
    locon = [row("l")]
    assert block_view(locon[0], {}, lycoris=True)[1][1] == "IN00"
    moved = set_block(locon, "l", 10, 0.5, {}, lycoris=True)  # MID of 20: the conv blocks stay at 1
    assert moved[0]["options"] == "lbw=" + ",".join(["1"] * 10 + ["0.5"] + ["1"] * 9)
    preset = [row("k", options="lbw=OUTD")]
    assert block_view(preset[0], {})[0] == "OUTD"
