import dataclasses
import math

import numpy as np
import pytest

from lmlab.errors import DecodingError, LMLabError
from lmlab.generate import SamplingParams, check_ids

INVALID = [
    # (setting, the field the message must name)
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=-0.5), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=math.nan), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_k=3.0), "top_k"),
    (dict(top_k=True), "top_k"),
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2.0), "num_beams"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-5), "max_new_tokens"),
    (dict(max_new_tokens=1.5), "max_new_tokens"),
    (dict(length_penalty=math.inf), "length_penalty"),
    (dict(early_stopping="never"), "early_stopping"),
    (dict(do_sample="yes"), "do_sample"),
    (dict(do_sample=True, temperature=0.0), "do_sample"),
    (dict(do_sample=True, num_beams=4), "do_sample"),
    (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(seed=2**63), "seed"),
    (dict(stop=("ok", "")), "stop"),
    (dict(stop=(3,)), "stop"),
    (dict(stop_ids=(-1,)), "stop_ids"),
    (dict(stop_ids=("a",)), "stop_ids"),
    (dict(eos_id=-2), "eos_id"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=math.nan), "repetition_penalty"),
    (dict(truncate_prompt="yes"), "truncate_prompt"),
]


@pytest.mark.parametrize("setting,field", INVALID, ids=lambda x: str(x))
def test_invalid_setting_raises_decoding_error_naming_the_field(setting, field):
    with pytest.raises(DecodingError) as err:
        SamplingParams(**setting)
    message = str(err.value)
    value = next(iter(setting.values())) if len(setting) == 1 else setting[field]
    assert message.startswith(f"{field}={value!r} is invalid"), message
    # One error class for the library, the CLI and the server (a ValueError to callers).
    assert isinstance(err.value, ValueError) and isinstance(err.value, LMLabError)


@pytest.mark.parametrize(
    "setting",
    [
        dict(),
        dict(temperature=0),
        dict(temperature=0.7, top_k=40, top_p=0.9, seed=123),
        dict(top_p=1.0),
        dict(top_p=1e-9),
        dict(num_beams=4, length_penalty=-1.0, early_stopping=True),
        dict(max_new_tokens=1, stop=("\n",), stop_ids=(0, 1), eos_id=2),
        dict(repetition_penalty=1.3, truncate_prompt=True, do_sample=False),
        dict(top_k=np.int64(5), seed=np.int64(1)),
    ],
)
def test_valid_settings_are_accepted(setting):
    SamplingParams(**setting).validate()


def test_sample_resolution():
    assert SamplingParams().sample  # default temperature 1: pure ancestral sampling
    assert not SamplingParams(temperature=0).sample  # temperature 0 means greedy
    assert not SamplingParams(num_beams=3).sample  # beam search never samples
    assert not SamplingParams(do_sample=False, temperature=0.8).sample
    assert SamplingParams(do_sample=True, temperature=0.8).sample


def test_lists_become_tuples_and_a_bare_stop_string_is_wrapped():
    params = SamplingParams(stop="END", stop_ids=[3, 4])
    assert params.stop == ("END",) and params.stop_ids == (3, 4)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    hash(params)  # still hashable


def test_params_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 2.0


def test_from_dict_names_the_closest_field():
    assert SamplingParams.from_dict({"top_p": 0.5}).top_p == 0.5
    with pytest.raises(DecodingError, match="'top_q'.*did you mean 'top_p'"):
        SamplingParams.from_dict({"top_q": 0.5})
    with pytest.raises(DecodingError, match="^top_p=2"):
        SamplingParams.from_dict({"top_p": 2})


def test_check_ids_accepts_in_range_ids():
    check_ids([0, 5, 9], 10, "prompt")
    check_ids([], 10, "stop_ids")
    check_ids(np.array([1, 2]).tolist(), 10, "prompt")


@pytest.mark.parametrize(
    "ids,expected",
    [
        ([1, 10], "prompt has token id 10 at position 1; valid ids are 0..9 (vocab_size=10)"),
        ([-1], "prompt has token id -1 at position 0; valid ids are 0..9"),
        ([1, 2.0], "prompt has 2.0 (float) at position 1"),
        ([True], "prompt has True (bool) at position 0"),
        ("abc", "prompt must be a list of token ids, got str"),
    ],
)
def test_check_ids_rejects_with_position_and_range(ids, expected):
    with pytest.raises(DecodingError) as err:
        check_ids(ids, 10, "prompt")
    assert expected in str(err.value)
