"""Decoding options of the wrong type are one LmlabError naming the option, from the API
and from a checkpoint's generation_config.json (which names the file), before torch sees
them; values from the checkpoint give way to the caller's."""

from __future__ import annotations

import json

import pytest
from helpers import run_lmlab, tiny_checkpoint

import lmlab
from lmlab.errors import LmlabError


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return lmlab.load(tiny_checkpoint(tmp_path_factory.mktemp("m") / "ckpt"))


@pytest.mark.parametrize(
    "options, named",
    [
        ({"max_new_tokens": "5"}, "max_new_tokens must be an integer, not '5'"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer, not 2.5"),
        ({"temperature": "hot"}, "temperature must be a number, not 'hot'"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"seed": 2**70}, "seed must be in [0, 2**64)"),
        ({"seed": -1}, "seed must be in [0, 2**64)"),
        ({"num_beams": True}, "num_beams must be an integer, not True"),
        ({"top_k": 1.5}, "top_k must be an integer (or null), not 1.5"),
        ({"stop": 3}, "stop must be a string or a list of strings, not 3"),
        ({"eos_token_id": ["x"]}, "eos_token_id must be a token id or a list of token ids"),
        ({"bad_words_ids": [["a"]]}, "bad_words_ids must be a list of lists of token ids"),
        ({"early_stopping": "sometimes"}, "early_stopping must be true, false or 'never'"),
    ],
)
def test_bad_option_types_name_the_option(model, options, named):
    with pytest.raises(LmlabError) as e:
        model.generate("ab", **options)
    assert named in str(e.value), str(e.value)


def test_good_values_of_every_accepted_type_pass(model):
    out = model.generate("ab", max_new_tokens=3, temperature=1, top_k=None, top_p=0.9, seed=2**63,
                         stop=".", eos_token_id=[], early_stopping=False)
    assert isinstance(out, str)


def test_a_bad_stored_setting_names_the_file_and_the_callers_value_wins(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", generation_config={"temperature": "hot", "max_new_tokens": 4})
    m = lmlab.load(ckpt)
    with pytest.raises(LmlabError, match=r"ckpt/generation_config.json: temperature must be a number, not 'hot'; fix"):
        m.generate("ab")
    assert len(m.generate_ids("ab", temperature=0)) == 4  # the caller's temperature replaces the bad one
    r = run_lmlab("generate", str(ckpt), "--prompt", "ab", check_rc=2)
    assert r.stderr.startswith("lmlab: error: ") and "generation_config.json: temperature" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_stored_setting_of_the_wrong_shape_is_named(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    gen = json.loads((ckpt / "generation_config.json").read_text())
    gen["max_new_tokens"] = -1
    (ckpt / "generation_config.json").write_text(json.dumps(gen))
    with pytest.raises(LmlabError, match="generation_config.json: max_new_tokens must be >= 0"):
        lmlab.load(ckpt).generate("ab")
