from __future__ import annotations

import pytest

from studio.errors import SettingsError
from studio.request import GenerationRequest


@pytest.mark.parametrize("field,value,message", [
    ("steps", 0, "`steps` must be between 1 and 200, got 0"),
    ("cfg", 31.0, "`cfg` must be between 0 and 30, got 31.0"),
    ("width", 100, "`width` must be a multiple of 8 between 64 and 2048, got 100"),
    ("height", 4096, "`height` must be a multiple of 8 between 64 and 2048, got 4096"),  # the UI's limit too
    ("seed", -2, "`seed` must be -1 (random)"),
    ("sampler", "Heun", "`sampler` must be one of"),
    ("loras", (("x", 7.5),), "LoRA `x` weight must be between -4 and 4, got 7.5"),
])
def test_impossible_values_are_named(field, value, message):
    with pytest.raises(SettingsError) as err:
        GenerationRequest(prompt="p", **{field: value}).validated()
    assert message in str(err.value)


def test_random_seed_is_made_concrete_once():
    request = GenerationRequest(prompt="p").with_seed()
    assert 0 <= request.seed < 2**32 and request.with_seed() is request


def test_from_dict_accepts_json_numbers_and_refuses_unknown_keys():
    request = GenerationRequest.from_dict({"prompt": "p", "seed": 5.0, "steps": "12", "cfg": 3,
                                           "loras": [["a", 0.5]]})
    assert (request.seed, request.steps, request.cfg, request.loras) == (5, 12, 3.0, (("a", 0.5),))
    with pytest.raises(SettingsError, match="unknown request field"):
        GenerationRequest.from_dict({"prompt": "p", "stepz": 3})
    with pytest.raises(SettingsError, match="`steps` must be a whole number"):
        GenerationRequest.from_dict({"prompt": "p", "steps": 2.5})


@pytest.mark.parametrize("field, value, message", [
    ("steps", 2.5, "`steps` must be a whole number, got 2.5"),
    ("seed", 1.5, "`seed` must be a whole number, got 1.5"),
    ("width", True, "`width` must be a whole number, got True"),
    ("cfg", "5", "`cfg` must be a number, got '5'"),
    ("prompt", "x" * 8001, "`prompt` is 8,001 characters long; the limit is 8,000"),
    ("negative", "x" * 9000, "`negative` is 9,000 characters long"),
])
def test_a_request_holds_whole_numbers_where_whole_numbers_are_meant(field, value, message):
    """2.5 steps ran 2 steps (issue 11, item 8): a request never bends a value, it names it."""
    with pytest.raises(SettingsError) as err:
        GenerationRequest(**{"prompt": "p", field: value}).validated()
    assert message in str(err.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "nan", "abc"])
def test_json_numbers_that_are_not_numbers_are_named(value):
    with pytest.raises(SettingsError, match="`steps` must be a whole number"):
        GenerationRequest.from_dict({"prompt": "p", "steps": value})
