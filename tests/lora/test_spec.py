"""The `<lora:...>` syntax: A1111's te/unet, the LBW extension's lbw=/start=/stop=, and tags that do not parse."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from studio.errors import SettingsError
from studio.infotext import split_lora_tags
from studio.lora.spec import LoraSpec, StepRange, parse_tag, spec_of, split_tags


@pytest.mark.parametrize("tag, spec", [
    ("<lora:warm:0.8>", LoraSpec("warm", 0.8)),
    ("<lora:warm:0.8:0.5>", LoraSpec("warm", 0.8, 0.5)),  # A1111 <lora:name:te:unet>
    ("<lora:warm:te=0.8:unet=0.5>", LoraSpec("warm", 0.8, 0.5)),
    ("<lora:warm:unet=0.5:te=0.8>", LoraSpec("warm", 0.8, 0.5)),
    ("<lora:warm:unet=0.3>", LoraSpec("warm", 0.3)),  # A1111: te defaults to the unet weight
    ("<lora:warm:1:lbw=INS>", LoraSpec("warm", 1.0, None, "INS")),
    ("<lora:warm:1:1:lbw=OUTD>", LoraSpec("warm", 1.0, 1.0, "OUTD")),  # the extension's README form
    ("<lora:warm:lbw=ALL:stop=10>", LoraSpec("warm", 1.0, None, "ALL", None, 10)),
    ("<lora:warm:1:INS>", LoraSpec("warm", 1.0, None, "INS")),  # the extension's older positional form
    ("<lora:warm:1:lbw=1,0,0,0,0,0,0,0,0,1,1,1>", LoraSpec("warm", 1.0, None, "1,0,0,0,0,0,0,0,0,1,1,1")),
    ("<lora:warm:1:start=0.25:stop=0.75>", LoraSpec("warm", 1.0, None, "", 0.25, 0.75)),
    ("<lora:warm:1:step=5-10>", LoraSpec("warm", 1.0, None, "", 5, 10)),
    ("<lora:warm:1e-1>", LoraSpec("warm", 0.1)),
])
def test_tags_parse(tag, spec):
    assert parse_tag(tag) == spec


@pytest.mark.parametrize("tag, words", [
    ("<lora:demo-kohya-warm:1e30>", ["demo-kohya-warm", "between -4 and 4"]),  # issue 11 item 7
    ("<lora:demo-kohya-warm:nan>", ["demo-kohya-warm", "must be a number", "'nan'"]),
    ("<lora:demo-kohya-warm:inf>", ["demo-kohya-warm", "must be a number"]),
    ("<lora:warm:abc:lbw=INS>", ["warm", "must be a number"]),
    ("<lora:warm:1:2:3>", ["too many numbers"]),
    ("<lora:warm:1:dyn=8>", ["unknown argument dyn="]),
    ("<lora:warm:1:unet=1:0.5>", ["given twice"]),
    ("<lora:warm:1:start=8:stop=2>", ["never run"]),
    ("<lora:warm:1:stop=2.5>", ["whole step number"]),
    ("<lora:warm:1:start=-1>", ["whole step number"]),
    ("<lora:warm:1:step=5>", ["step=5-10"]),
    ("<lora::1>", ["needs a name"]),
    ("<lora:warm:1", ["not closed"]),
])
def test_a_tag_that_does_not_parse_is_one_clear_error(tag, words):
    with pytest.raises(SettingsError) as err:
        split_lora_tags(f"a cat {tag} at night")
    message = str(err.value)
    assert all(w in message for w in words), message
    assert "\n" not in message and tag.rstrip(">") in message  # it names the tag


def test_tags_leave_the_prompt_and_keep_their_order():
    text, specs = split_tags("a <lora:x:1> cat <lora:y-2:-0.5:lbw=INS>, at night")
    assert text == "a cat , at night"
    assert [s.entry() for s in specs] == [("x", 1.0), ("y-2", -0.5, "lbw=INS")]


def test_a_spec_round_trips_through_its_tag_and_its_request_entry():
    spec = LoraSpec("warm", 0.7, 0.35, "1,0,0,1,1,1,0.5,0,0,0,0,0", 2, 0.75)
    assert parse_tag(spec.tag()) == spec
    assert spec.tag() == "<lora:warm:0.7:0.35:lbw=1,0,0,1,1,1,0.5,0,0,0,0,0:start=2:stop=0.75>"
    assert spec_of(spec.entry()) == spec
    assert spec.entry()[2] == "unet=0.35:lbw=1,0,0,1,1,1,0.5,0,0,0,0,0:start=2:stop=0.75"
    assert LoraSpec("warm", 0.5).entry() == ("warm", 0.5)  # plain LoRAs stay pairs


@given(st.floats(-4, 4, allow_nan=False))
def test_weights_in_tags_are_lossless(weight):
    assert parse_tag(LoraSpec("w", weight).tag()).weight == weight


@pytest.mark.parametrize("rng, steps, on", [
    (StepRange(None, 10), 20, list(range(10))),
    (StepRange(10, None), 20, list(range(10, 20))),
    (StepRange(0.25, 0.75), 20, list(range(5, 15))),
    (StepRange(5, 10), 8, [5, 6, 7]),
    (StepRange(None, 0.5), 3, [0, 1]),  # 1.5 rounds half up
])
def test_step_ranges_count_from_zero(rng, steps, on):
    assert [i for i in range(steps) if rng.active(i, steps)] == on
