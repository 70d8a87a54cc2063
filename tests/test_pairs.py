"""lmlab.pairs: parallel text in its three forms, every way it can be wrong, and its batches."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from helpers import lmlab_warnings, recorded_warnings

from lmlab.errors import LmlabError
from lmlab.pairs import Pairs, bucket_batches, pad_batch, read_pairs


def write(path: Path, text: str | bytes) -> Path:
    """``text`` into ``path`` (UTF-8), gzip-compressed when the name ends in .gz."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def error(match: str, *args, **kwargs) -> str:
    """The LmlabError that read_pairs(*args) raises: it must be one line and contain ``match``."""
    with pytest.raises(LmlabError) as e:
        read_pairs(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert match in msg, msg
    return msg


# --------------------------------------------------------------------------- the three forms
@pytest.mark.parametrize("name", ["train.tsv", "train.tsv.gz", "TRAIN.TSV"])
def test_tsv_pairs_plain_and_gzipped(tmp_path, name):
    path = write(tmp_path / name, "Hello .\tHallo .\r\n  a cat  \t eine Katze \n我爱你\tI love you\n")
    p = read_pairs(path)
    assert p.sources == ["Hello .", "a cat", "我爱你"]
    assert p.targets == ["Hallo .", "eine Katze", "I love you"]
    assert p.references is None and p.skipped == 0 and len(p) == 3


@pytest.mark.parametrize("header", ["source\ttarget", "SRC\tTGT", "Source\tTarget", "en\tde"])
def test_tsv_header_row_is_skipped(tmp_path, header):
    path = write(tmp_path / "t.tsv", f"{header}\nsource\ttarget value\n")
    p = read_pairs(path, source_field="en", target_field="de")
    assert (p.sources, p.targets) == (["source"], ["target value"])


def test_tsv_header_only_on_the_first_row(tmp_path):
    path = write(tmp_path / "t.tsv", "a\tb\nsrc\ttgt\n")
    assert read_pairs(path).sources == ["a", "src"]


def test_utf8_bom_is_stripped_and_unicode_line_separators_are_not_line_breaks(tmp_path):
    # U+2028 and U+0085 inside a sentence: str.splitlines would cut the pair in two.
    path = write(tmp_path / "t.tsv", "\ufeffa\u2028b\tc\x85d\ne\tf")
    p = read_pairs(path)
    assert p.sources == ["a\u2028b", "e"] and p.targets == ["c\x85d", "f"]


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz"])
def test_jsonl_pairs(tmp_path, name):
    rows = [{"src": " Guten Tag ", "tgt": "Good day", "id": 1}, {"src": "猫", "tgt": "cat"}]
    path = write(tmp_path / name, jsonl(rows) + "\n")  # a trailing blank line is fine
    p = read_pairs(path)
    assert (p.sources, p.targets, p.references) == (["Guten Tag", "猫"], ["Good day", "cat"], None)


def test_jsonl_named_fields_and_multiple_references(tmp_path):
    rows = [
        {"article": "a long text", "summary1": "s1", "summary2": "s2", "summary3": "s3"},
        {"article": "another", "summary1": "t1", "summary2": "", "summary3": "t3"},
    ]
    path = write(tmp_path / "cnn.jsonl", jsonl(rows))
    p = read_pairs(path, source_field="article", target_field="summary1, summary2,summary3")
    assert p.sources == ["a long text", "another"]
    assert p.targets == ["s1", "t1"]
    assert p.references == [["s1", "s2", "s3"], ["t1", "t3"]]  # an empty reference is a missing one


def test_jsonl_null_side_counts_as_empty(tmp_path):
    path = write(tmp_path / "d.jsonl", jsonl([{"src": None, "tgt": "x"}, {"src": "a", "tgt": "b"}]))
    with recorded_warnings() as caught:
        p = read_pairs(path)
    assert p.sources == ["a"] and p.skipped == 1
    assert lmlab_warnings(caught) == [f"skipped 1 pair with an empty source or target in {path}"]


@pytest.mark.parametrize("gz", ["", ".gz"])
def test_two_line_aligned_files(tmp_path, gz):
    src = write(tmp_path / f"train.en{gz}", "one\r\ntwo\nthree\n")
    tgt = write(tmp_path / f"train.de{gz}", "eins\nzwei\ndrei")  # no final newline: same 3 lines
    p = read_pairs(src, tgt)
    assert (p.sources, p.targets) == (["one", "two", "three"], ["eins", "zwei", "drei"])


def test_empty_sides_are_skipped_with_one_warning(tmp_path):
    path = write(tmp_path / "train.tsv", "a\tb\n\tx\ny\t \n  \t\nc\td\n")
    with recorded_warnings() as caught:
        p = read_pairs(path)
    assert (p.sources, p.targets, p.skipped) == (["a", "c"], ["b", "d"], 3)
    assert lmlab_warnings(caught) == [f"skipped 3 pairs with an empty source or target in {path}"]


def test_empty_lines_in_two_files_are_skipped_together(tmp_path):
    src = write(tmp_path / "a.en", "one\n\nthree\n")
    tgt = write(tmp_path / "a.de", "eins\nzwei\n\n")
    with recorded_warnings() as caught:
        p = read_pairs(src, tgt)
    assert (p.sources, p.targets, p.skipped) == (["one"], ["eins"], 2)
    assert lmlab_warnings(caught) == [f"skipped 2 pairs with an empty source or target in {src} and {tgt}"]


def test_no_warning_when_nothing_is_skipped(tmp_path):
    with recorded_warnings() as caught:
        read_pairs(write(tmp_path / "t.tsv", "a\tb\n\n"))  # a blank line is no pair at all
    assert lmlab_warnings(caught) == []


# --------------------------------------------------------------------------- errors
def test_tsv_row_with_three_fields(tmp_path):
    path = write(tmp_path / "train.tsv", "a\tb\n" * 6 + "x\ty\tz\n")
    error(f"{path} line 7 has 3 tab-separated fields, a pair needs exactly 2 (source<TAB>target)", path)


def test_tsv_row_with_one_field(tmp_path):
    path = write(tmp_path / "train.tsv", "a\tb\nno tab here\n")
    error("line 2 has 1 tab-separated field, a pair needs exactly 2", path)


def test_jsonl_missing_field_names_the_keys_and_the_options(tmp_path):
    path = write(tmp_path / "d.jsonl", jsonl([{"src": "a", "tgt": "b"}, {"en": "a", "de": "b"}]))
    msg = error(f"{path} line 2 has no field 'src'", path)
    assert "'en', 'de'" in msg and "--source-field" in msg and "--target-field" in msg


def test_jsonl_missing_second_reference(tmp_path):
    path = write(tmp_path / "d.jsonl", jsonl([{"src": "a", "r1": "b"}]))
    error("line 1 has no field 'r2' (its keys: 'src', 'r1')", path, target_field="r1,r2")


def test_jsonl_invalid_json(tmp_path):
    path = write(tmp_path / "d.jsonl", jsonl([{"src": "a", "tgt": "b"}]) + '{"src": "a", "tgt": }\n')
    error(f"{path} line 2 is not valid JSON", path)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    error("line 1 is a JSON list, not an object", write(tmp_path / "d.jsonl", '["a", "b"]\n'))


def test_jsonl_field_that_is_not_text(tmp_path):
    path = write(tmp_path / "d.jsonl", jsonl([{"src": "a", "tgt": 3}]))
    error("line 1: field 'tgt' is a JSON int, not a string", path)


def test_two_files_of_different_lengths(tmp_path):
    src = write(tmp_path / "a.en", "1\n2\n3\n")
    tgt = write(tmp_path / "a.de", "1\n2\n")
    msg = error(f"the sources {src} have 3 lines but the targets {tgt} have 2", src, tgt)
    assert "line-aligned" in msg


def test_missing_files(tmp_path):
    error(f"--data {tmp_path / 'no.tsv'} does not exist", tmp_path / "no.tsv")
    src = write(tmp_path / "a.en", "x\n")
    error(f"{tmp_path / 'no.de'} does not exist", src, tmp_path / "no.de")
    error(f"--valid-data {tmp_path} is a folder", tmp_path, what="--valid-data")


def test_plain_text_without_targets(tmp_path):
    msg = error("is neither .tsv nor .jsonl", write(tmp_path / "a.en", "x\n"))
    assert "second line-aligned file" in msg


def test_targets_file_with_a_tsv(tmp_path):
    error(
        "already holds pairs (a .tsv file)", write(tmp_path / "a.tsv", "a\tb\n"), write(tmp_path / "b", "x\n")
    )


def test_not_utf8(tmp_path):
    path = write(tmp_path / "t.tsv", b"a\tb\n" + "café\tx\n".encode("latin-1"))
    error(f"{path} is not valid UTF-8 (line 2", path)


def test_not_gzip(tmp_path):
    path = tmp_path / "t.tsv.gz"
    path.write_text("a\tb\n")
    error(f"{path} is not a valid gzip file", path)


def test_binary_file(tmp_path):
    error("looks like a binary file", write(tmp_path / "t.tsv", "a\tb\n".encode("utf-16-le")))


@pytest.mark.parametrize("text", ["", "\n\n", "src\ttgt\n", "\tx\ny\t\n"])
def test_no_pairs_at_all(tmp_path, text):
    path = write(tmp_path / "t.tsv", text)
    with recorded_warnings():
        error(f"{path} holds no pairs", path)


# --------------------------------------------------------------------------- split and head
def numbered(n: int, multi: bool = False) -> Pairs:
    refs = [[f"t{i}", f"r{i}"] for i in range(n)] if multi else None
    return Pairs([f"s{i}" for i in range(n)], [f"t{i}" for i in range(n)], refs, skipped=4)


def test_split_is_deterministic_disjoint_and_ordered():
    p = numbered(100, multi=True)
    train, valid = p.split(0.1, seed=3)
    assert (len(train), len(valid)) == (90, 10)
    assert sorted(train.sources + valid.sources) == sorted(p.sources)
    assert train.sources == sorted(train.sources, key=lambda s: int(s[1:]))  # file order kept
    assert valid.references == [[t, "r" + t[1:]] for t in valid.targets]  # stays aligned
    assert p.split(0.1, seed=3)[1].sources == valid.sources
    assert p.split(0.1, seed=4)[1].sources != valid.sources
    assert train.skipped == 4 and valid.skipped == 0


@pytest.mark.parametrize(("n", "frac", "n_valid"), [(2, 0.01, 1), (2, 0.99, 1), (10, 0.25, 2), (5, 0.9, 4)])
def test_split_keeps_a_pair_on_each_side(n, frac, n_valid):
    train, valid = numbered(n).split(frac)
    assert (len(train), len(valid)) == (n - n_valid, n_valid)


def test_split_cap_and_errors():
    assert len(numbered(1000).split(0.5, max_valid=7)[1]) == 7
    with pytest.raises(LmlabError, match="between 0 and 1"):
        numbered(10).split(1.0)
    with pytest.raises(LmlabError, match="from 1 pair; give at least 2"):
        numbered(1).split(0.5)


def test_head():
    p = numbered(5, multi=True)
    assert p.head(2).sources == ["s0", "s1"] and p.head(2).references == [["t0", "r0"], ["t1", "r1"]]
    assert len(p.head(50)) == 5 and len(p.head(0)) == 0


# --------------------------------------------------------------------------- batches
LENS_SRC = [(i * 37) % 50 + 1 for i in range(200)]
LENS_TGT = [(i * 11) % 60 + 1 for i in range(200)]


def padded(batch: list[int]) -> int:
    return len(batch) * max(max(LENS_SRC[i], LENS_TGT[i]) for i in batch)


def test_bucket_batches_cover_each_index_once_within_the_budget():
    batches = bucket_batches(LENS_SRC, LENS_TGT, batch_tokens=256, seed=1)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(200))
    assert all(padded(b) <= 256 for b in batches)
    assert all(isinstance(i, int) for i in flat)
    # Sorted batches waste little: the padded total is close to the real token count.
    real = sum(max(s, t) for s, t in zip(LENS_SRC, LENS_TGT))
    assert sum(padded(b) for b in batches) < 1.25 * real


def test_bucket_batches_saves_padding_against_random_batches():
    sizes = [len(b) for b in bucket_batches(LENS_SRC, LENS_TGT, batch_size=16)]
    assert sizes.count(16) == 12 and sorted(sizes)[0] == 8  # 200 = 12·16 + 8
    sorted_pad = sum(padded(b) for b in bucket_batches(LENS_SRC, LENS_TGT, batch_size=16))
    file_order_pad = sum(padded(list(range(i, min(i + 16, 200)))) for i in range(0, 200, 16))
    assert sorted_pad < 0.7 * file_order_pad


def test_bucket_batches_deterministic_per_seed_and_epoch():
    a = bucket_batches(LENS_SRC, LENS_TGT, batch_tokens=300, seed=0, epoch=0)
    assert a == bucket_batches(LENS_SRC, LENS_TGT, batch_tokens=300, seed=0, epoch=0)
    assert a != bucket_batches(LENS_SRC, LENS_TGT, batch_tokens=300, seed=0, epoch=1)
    assert a != bucket_batches(LENS_SRC, LENS_TGT, batch_tokens=300, seed=1, epoch=0)


def test_equal_lengths_change_batches_across_epochs():
    same = [10] * 40
    e0 = {frozenset(b) for b in bucket_batches(same, same, batch_size=8, epoch=0)}
    e1 = {frozenset(b) for b in bucket_batches(same, same, batch_size=8, epoch=1)}
    assert e0 != e1  # the members, not only the order, vary


def test_a_pair_longer_than_the_budget_is_a_batch_of_its_own():
    src = [5, 5, 100, 5, 5, 60]
    tgt = [5, 5, 5, 5, 5, 70]
    batches = bucket_batches(src, tgt, batch_tokens=50)
    assert [2] in batches and [5] in batches
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(len(b) * max(max(src[i], tgt[i]) for i in b) <= 50 for b in batches if len(b) > 1)


def test_both_limits_hold_together():
    batches = bucket_batches([1] * 30, [1] * 30, batch_tokens=100, batch_size=4)
    assert max(len(b) for b in batches) == 4


def test_bucket_batches_errors_and_empty():
    assert bucket_batches([], [], batch_size=4) == []
    with pytest.raises(LmlabError, match="give batch_tokens or batch_size"):
        bucket_batches([1], [1])
    with pytest.raises(LmlabError, match="batch_tokens must be at least 1, not 0"):
        bucket_batches([1], [1], batch_tokens=0)
    with pytest.raises(LmlabError, match="2 source lengths but 1 target lengths"):
        bucket_batches([1, 2], [1], batch_size=2)


def test_pad_batch():
    ids, mask = pad_batch([[5, 6, 7], [8], []], pad_id=0)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    ids, mask = pad_batch([[1, 2]], pad_id=9)
    assert ids.tolist() == [[1, 2]] and mask.all()
    assert pad_batch([], pad_id=0)[0].shape == (0, 0)
