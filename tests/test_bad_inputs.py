"""Damaged and hostile checkpoints: one clear LmlabError each, before anything big is
allocated, and never a file read from outside the checkpoint folder.

Each case damages a tiny checkpoint the way a user, a disk or a hostile download would,
then loads it through the public API and through the CLI (one line on stderr, exit 2).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from helpers import run_lmlab, tiny_checkpoint, tiny_model
from safetensors.torch import save_file

import lmlab
from lmlab.checkpoint import RunDir
from lmlab.errors import LmlabError
from lmlab.models.limits import estimate_bytes
from lmlab.models.loading import write_checkpoint


@pytest.fixture
def ckpt(tmp_path):
    return tiny_checkpoint(tmp_path / "ckpt")


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


# --------------------------------------------------------------------------- config.json
@pytest.mark.parametrize(
    "changes, named",
    [
        ({"n_layer": "4"}, "n_layer must be an int, not '4'"),
        ({"n_layer": 2.5}, "n_layer must be an int, not 2.5"),
        ({"n_head": True}, "n_head must be an int, not true"),
        ({"vocab_size": 1e12}, "vocab_size must be an int"),
        ({"vocab_size": 10**12}, "vocab_size = 1000000000000 is out of range"),
        ({"max_seq_len": 10**12}, "max_seq_len = 1000000000000 is out of range"),
        ({"d_ff": 10**12}, "d_ff = 1000000000000 is out of range"),
        ({"n_layer": 10**9}, "n_layer = 1000000000 is out of range"),
        ({"n_layer": -1}, "n_layer must be positive (got -1)"),
        ({"norm_eps": float("nan")}, "norm_eps must be a finite number"),
        ({"norm_eps": -1.0}, "norm_eps must be positive"),
        ({"pos": 3}, "pos must be a str"),
        ({"model_type": ["x"]}, "model_type must be a string"),
        ({"lmlab": "x"}, "the field lmlab must be an object"),
        ({"tie_embeddings": "yes"}, "tie_embeddings must be a bool"),
    ],
)
def test_bad_config_fields_are_named(ckpt, changes, named):
    _edit_config(ckpt, **changes)
    with pytest.raises(LmlabError) as e:
        lmlab.load(ckpt)
    msg = str(e.value)
    assert named in msg and "config.json" in msg, msg
    assert "\n" not in msg


def test_bad_config_on_the_command_line_is_one_line(ckpt):
    _edit_config(ckpt, n_layer=10**9)
    r = run_lmlab("generate", str(ckpt), "--prompt", "a", "--max-new-tokens", "2", check_rc=2)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmlab: error: ") and "n_layer" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_a_model_bigger_than_the_machine_is_refused_before_allocating(ckpt, monkeypatch):
    # In range field by field, but 65M × 4096 × 4 bytes = 1 TB of embeddings: refused from
    # the estimate (a real allocation would fail or swap for minutes).
    _edit_config(ckpt, vocab_size=1 << 26, d_model=4096, n_head=32)
    with pytest.raises(LmlabError, match=r"GiB of weights \(mostly from vocab_size = 67,108,864\)"):
        lmlab.load(ckpt)


def test_the_size_estimate_matches_the_real_parameter_count():
    for options in ({}, {"tie_embeddings": False}, {"pos": "learned"}, {"n_kv_head": 1, "n_head": 4}):
        model = tiny_model(97, **options)
        n_bytes, _ = estimate_bytes(model.config)
        real = 4 * model.num_parameters()
        assert real <= n_bytes <= real * 1.2 + 4 * model.config.max_seq_len * model.config.d_model, options


# --------------------------------------------------------------------------- paths stay inside
@pytest.fixture
def sharded(tmp_path):
    """A Hugging Face-style Llama folder with an index over two shards (made by hand from
    an exported lmlab model, no download)."""
    transformers = pytest.importorskip("transformers")
    from helpers import bpe_tokenizer

    tok = bpe_tokenizer()
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(cfg)
    folder = tmp_path / "hf"
    model.save_pretrained(folder, max_shard_size="20KB")
    tok.save(str(folder / "tokenizer.json"))
    assert (folder / "model.safetensors.index.json").is_file()
    lmlab.load(folder)  # the intact folder loads
    return folder


def _rewrite_index(folder: Path, fn) -> None:
    index = folder / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    d["weight_map"] = {k: fn(v) for k, v in d["weight_map"].items()}
    index.write_text(json.dumps(d))


def test_index_with_an_absolute_shard_path_is_refused(sharded, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    first = sorted(sharded.glob("model-*.safetensors"))[0]
    shutil.copy(first, outside / first.name)
    _rewrite_index(sharded, lambda v: str(outside / v) if v == first.name else v)
    with pytest.raises(LmlabError, match="names shards outside the model folder"):
        lmlab.load(sharded)


def test_index_climbing_out_with_dotdot_is_refused(sharded, tmp_path):
    first = sorted(sharded.glob("model-*.safetensors"))[0]
    shutil.copy(first, tmp_path / first.name)
    _rewrite_index(sharded, lambda v: f"../{v}" if v == first.name else v)
    with pytest.raises(LmlabError, match=r"names shards outside the model folder \(\.\./"):
        lmlab.load(sharded)


def test_a_weight_file_linking_outside_is_refused(sharded, tmp_path):
    first = sorted(sharded.glob("model-*.safetensors"))[0]
    moved = tmp_path / "secret.safetensors"
    shutil.move(first, moved)
    os.symlink(moved, first)
    with pytest.raises(LmlabError, match="leads outside the model folder"):
        lmlab.load(sharded)


def test_a_hub_cache_snapshot_linking_to_its_blobs_loads(sharded, tmp_path):
    """huggingface_hub's cache keeps files in blobs/ and links them from snapshots/<rev>/."""
    repo = tmp_path / "models--me--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in sharded.iterdir():
        shutil.copy(f, blobs / f.name)
        os.symlink(Path("..") / ".." / "blobs" / f.name, snap / f.name)
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(lmlab.load(snap).logits(ids), lmlab.load(sharded).logits(ids))


# --------------------------------------------------------------------------- one checkpoint, whole
def test_a_reader_racing_saves_always_sees_one_whole_checkpoint(tmp_path):
    """A writer saves step after step (each step's weights differ) while readers load the
    run folder: every load succeeds, and the weights match the config of the same step
    (the step is stored in generation_config.json next to them)."""
    from helpers import char_tokenizer

    tok = char_tokenizer()
    run = RunDir(tmp_path / "run")
    models = [tiny_model(tok.get_vocab_size(), seed=i) for i in range(3)]
    stop = threading.Event()
    errors: list[str] = []

    def write(step: int) -> None:
        model = models[step % 3]
        run.save(step, lambda d: write_checkpoint(d, model, tok, {"step": step, "which": step % 3}))

    write(0)

    def writer() -> None:
        step = 1
        while not stop.is_set() and step < 400:
            write(step)
            step += 1

    t = threading.Thread(target=writer)
    t.start()
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = [m.eval()(ids)[0].detach() for m in models]
    loads = 0
    try:
        while t.is_alive() and loads < 150:
            try:
                m = lmlab.load(run.root)
            except LmlabError as e:  # pragma: no cover - what the test guards against
                errors.append(str(e))
                continue
            loads += 1
            which = m.generation_config["which"]
            torch.testing.assert_close(m.logits(ids), expected[which], atol=1e-5, rtol=0)
    finally:
        stop.set()
        t.join()
    assert loads > 10
    assert not errors, errors[:3]


def test_a_truly_corrupted_file_is_called_corrupted(ckpt):
    w = ckpt / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(LmlabError, match="corrupted or truncated"):
        lmlab.load(ckpt)


def test_weights_that_do_not_fit_the_config_are_named(ckpt):
    save_file({"tok_emb.weight": torch.zeros(3, 3)}, str(ckpt / "model.safetensors"))
    _edit_config(ckpt, lmlab={"format": 1})  # no checksum: the shape check speaks
    with pytest.raises(LmlabError, match="do not match its config.json"):
        lmlab.load(ckpt)


# --------------------------------------------------------------------------- one writer
_HOLD = """
import sys, time
from lmlab.checkpoint import RunLock
lock = RunLock(sys.argv[1], "lmlab train --out x").acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken_over(tmp_path):
    import signal
    import subprocess
    import sys

    from lmlab.checkpoint import RunLock

    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LmlabError, match=rf"in use by another process \(pid {holder.pid}, lmlab train --out x\)"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(tmp_path, "second") as lock:  # the dead process's lock is free again
        assert lock._fd is not None
        with pytest.raises(LmlabError, match="second"):
            RunLock(tmp_path).acquire()  # and within one process, a second lock is refused too
    RunLock(tmp_path).acquire().release()


def test_stale_temporary_step_folders_are_removed(tmp_path):
    from helpers import char_tokenizer

    run = RunDir(tmp_path / "run")
    tok = char_tokenizer()
    model = tiny_model(tok.get_vocab_size())
    run.save(1, lambda d: write_checkpoint(d, model, tok, {}))
    stale = run.store / ".tmp-step-00000002-999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert run.remove_stale_temporaries() == [stale]
    assert not stale.exists() and (run.root / "config.json").is_file()


# --------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 400 KB tmpfs (needs root and mount rights: skipped with the reason elsewhere)."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or 'mount failed'})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_leaves_the_last_checkpoint_whole_and_no_temporary(small_disk):
    from helpers import char_tokenizer

    tok = char_tokenizer()
    small, big = tiny_model(tok.get_vocab_size(), d_model=16), tiny_model(tok.get_vocab_size(), d_model=256)
    run = RunDir(small_disk / "run")
    run.save(1, lambda d: write_checkpoint(d, small, tok, {"step": 1}))
    with pytest.raises(LmlabError, match=r"no space left on the disk of .* the last checkpoint is unchanged; .*--resume"):
        run.save(2, lambda d: write_checkpoint(d, big, tok, {"step": 2}))  # ~1.5 MB: does not fit
    assert not [d for d in run.store.iterdir() if d.name.startswith(".tmp-")]
    m = lmlab.load(run.root)
    assert m.generation_config["step"] == 1 and m.config.d_model == 16
    run.save(3, lambda d: write_checkpoint(d, small, tok, {"step": 3}))  # space is back: saving works
    assert lmlab.load(run.root).generation_config["step"] == 3



# --------------------------------------------------------------------------- text that is not UTF-8
def test_a_prompt_with_lone_surrogates_is_replaced_with_a_warning(ckpt):
    from lmlab.messages import LmlabWarning

    m = lmlab.load(ckpt)
    bad = b"ab\xff\xfe".decode("utf-8", "surrogateescape")
    with pytest.warns(LmlabWarning, match="not UTF-8"):
        ids = m.encode(bad)
    assert ids == m.encode("ab\ufffd\ufffd")


def test_a_non_utf8_prompt_on_the_command_line_is_not_a_traceback(ckpt):
    import subprocess
    import sys

    from helpers import REPO, cli_env

    code = "import sys; from lmlab.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "generate", str(ckpt).encode(), b"--prompt", b"ab\xff\xfe",
            b"--max-new-tokens", b"2", b"--seed", b"0"]
    r = subprocess.run(argv, capture_output=True, env=cli_env(), cwd=REPO, timeout=120)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 0, err
    assert "Traceback" not in err and "lmlab: warning: the text holds bytes that are not UTF-8" in err


# --------------------------------------------------------------------------- concurrent writers
def test_a_second_trainer_on_the_same_out_stops_at_once_naming_the_first(tmp_path, corpus_path):
    from helpers import cli_env, finish, lmlab_cmd, popen, wait_for_step

    out = tmp_path / "run"
    args = ("train", "--data", str(corpus_path), "--out", str(out), "--n-layer", "1", "--d-model", "16",
            "--n-head", "2", "--max-seq-len", "16", "--batch-size", "2", "--eval-every", "1000",
            "--device", "cpu", "--no-progress")
    first = popen(lmlab_cmd(*args, "--steps", "100000"), env=cli_env())
    try:
        wait_for_step(out, 1, first)
        second = run_lmlab(*args, "--steps", "5", "--overwrite", check_rc=2)
        line = second.stderr.strip().splitlines()[-1]
        assert f"in use by another process (pid {first.pid}, lmlab train --out {out})" in line, second.stderr
        resume = run_lmlab("train", "--resume", str(out), "--steps", "5", check_rc=2)
        assert f"pid {first.pid}" in resume.stderr
    finally:
        first.kill()
        finish(first, rc=-9)
    # the dead process's lock is taken over, its half-written save (if any) removed
    stale = out / ".ckpt" / ".tmp-step-00000099-999999"
    stale.mkdir(parents=True, exist_ok=True)
    run_lmlab("train", "--resume", str(out), "--steps", "3", "--no-progress")
    assert not stale.exists()


def test_a_damaged_trainer_state_is_one_line(tmp_path, corpus_path):
    out = tmp_path / "run"
    run_lmlab("train", "--data", str(corpus_path), "--out", str(out), "--n-layer", "1", "--d-model", "16",
              "--n-head", "2", "--max-seq-len", "16", "--batch-size", "2", "--steps", "2", "--no-progress")
    state = (out / "trainer_state.json").resolve()
    good = json.loads(state.read_text())
    cases = (
        (json.dumps({**good, "step": "x"}), "step must be a non-negative number, not 'x'"),
        (json.dumps({**good, "elapsed": -3}), "elapsed must be a non-negative number"),
        (json.dumps({k: v for k, v in good.items() if k != "train_config"}), "has no train_config"),
        ("{not json", "damaged or not JSON"),
    )
    for bad, named in cases:
        state.write_text(bad)
        r = run_lmlab("train", "--resume", str(out), "--steps", "4", check_rc=2)
        assert named in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_an_export_racing_another_into_the_same_folder_is_refused(ckpt, tmp_path, monkeypatch):
    import lmlab.hf as hf

    real = hf._write_hf_folder
    out = tmp_path / "hf"

    def racing(work, *a, **kw):
        real(work, *a, **kw)
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text("{}")  # the other export finished first

    monkeypatch.setattr(hf, "_write_hf_folder", racing)
    model = lmlab.load(tiny_checkpoint(tmp_path / "gpt", pos="learned", norm="layernorm", mlp_bias=True,
                                       gated_mlp=False, activation="gelu_new"))
    with pytest.raises(LmlabError, match="was filled by another process while exporting"):
        hf.export_hf(model, out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.tmp")]
    assert (out / "config.json").read_text() == "{}"  # the winner's folder is untouched


# --------------------------------------------------------------------------- found by a bad-input probe
def _small_run(tmp_path, corpus_path, steps=2):
    out = tmp_path / "run"
    run_lmlab("train", "--data", str(corpus_path), "--out", str(out), "--n-layer", "1", "--d-model", "16",
              "--n-head", "2", "--max-seq-len", "16", "--batch-size", "2", "--steps", str(steps), "--no-progress")
    return out


def _one_error_line(r):
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and len(lines) == 1 and lines[0].startswith("lmlab: error: "), r.stderr
    return lines[0]


def test_a_broken_latest_link_is_named(tmp_path, corpus_path):
    out = _small_run(tmp_path, corpus_path)
    latest = out / ".ckpt" / "latest"
    target = os.readlink(latest)
    for broken in ("latest", "step-99999999"):  # a loop of links; a step folder that is gone
        latest.unlink()
        latest.symlink_to(broken)
        with pytest.raises(LmlabError, match=r"\.ckpt/latest does not lead to a step folder"):
            lmlab.load(out)
        line = _one_error_line(run_lmlab("info", str(out), check_rc=2))
        assert "ln -sfn" in line
    latest.unlink()
    latest.symlink_to(target)
    lmlab.load(out)


def test_damaged_training_state_fields_are_named_on_resume_and_info(tmp_path, corpus_path):
    out = _small_run(tmp_path, corpus_path)
    state = (out / "trainer_state.json").resolve()
    good = json.loads(state.read_text())
    cases = [
        ({**good, "best_val": "low"}, "best_val must be a non-negative number, not 'low'"),
        ({**good, "elapsed": float("nan")}, "elapsed must be a non-negative number"),
        ({**good, "train_config": {**good["train_config"], "lr": "fast"}}, "train_config: lr must be a number, not 'fast'"),
        ({**good, "train_config": {**good["train_config"], "batch_size": None}},
         "train_config: batch_size must be an integer, not None"),
    ]
    for bad, named in cases:
        state.write_text(json.dumps(bad))
        line = _one_error_line(run_lmlab("train", "--resume", str(out), "--steps", "4", check_rc=2))
        assert named in line and "trainer_state.json" in line, line
        if "train_config" not in named:
            assert named in _one_error_line(run_lmlab("info", str(out), check_rc=2))


def test_resuming_when_the_data_is_gone_says_where_it_was_stored(tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT_SAMPLE * 20)
    out = _small_run(tmp_path, corpus)
    corpus.unlink()
    line = _one_error_line(run_lmlab("train", "--resume", str(out), "--steps", "4", check_rc=2))
    assert f"{corpus} (stored in {out}/trainer_state.json), is no longer there" in line


TEXT_SAMPLE = "It was the best of times, it was the worst of times.\n"


@pytest.mark.parametrize(
    "options, named",
    [
        ({"steps": "3"}, "--steps must be an integer, not '3'"),
        ({"lr": "fast"}, "--lr must be a number, not 'fast'"),
        ({"n_layer": 1.5}, "--n-layer must be an integer, not 1.5"),
        ({"out": ""}, "--out is empty"),
        ({"d_model": 100_000_000, "n_head": 1}, "d_model = 100000000 is out of range"),
        ({"batch_size": 10**9}, "lower --batch-size"),
    ],
)
def test_bad_training_options_from_python_are_one_error(tmp_path, corpus_path, options, named):
    base = {"data": str(corpus_path), "out": str(tmp_path / "o"), "n_layer": 1, "d_model": 16, "n_head": 2,
            "max_seq_len": 16, "batch_size": 2, "steps": 2, "progress": False, "device": "cpu"}
    with pytest.raises(LmlabError, match=re.escape(named)):
        lmlab.train(**{**base, **options})


def test_bad_api_arguments_are_lmlab_errors(ckpt):
    for path in (123, None):
        with pytest.raises(LmlabError, match="takes a folder path or a Hub id"):
            lmlab.load(path)
    m = lmlab.load(ckpt)
    with pytest.raises(LmlabError, match=r"item 1 of the list is int 5"):
        m.generate(["a", 5])
    with pytest.raises(LmlabError, match="do_sample must be True or False, not 'yes'"):
        m.generate("a", do_sample="yes")
    with pytest.raises(LmlabError, match=r"generating 10,000,000 sequences at once .* generate fewer at once"):
        m.generate("a", max_new_tokens=3, num_return_sequences=10_000_000, temperature=1.0)


def test_a_stored_do_sample_of_the_wrong_type_names_the_file(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "c", generation_config={"do_sample": "yes"})
    with pytest.raises(LmlabError, match=r"generation_config.json: do_sample must be true or false, not 'yes'"):
        lmlab.load(ckpt).generate("a", max_new_tokens=2)


def test_a_newer_checkpoint_format_and_a_config_linking_out_are_refused(ckpt, tmp_path):
    raw = json.loads((ckpt / "config.json").read_text())
    raw["lmlab"]["format"] = 9
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(LmlabError, match=r"written by a newer lmlab \(checkpoint format 9; this lmlab reads format 1"):
        lmlab.load(ckpt)
    raw["lmlab"]["format"] = 1
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps(raw))
    (ckpt / "config.json").unlink()
    os.symlink(elsewhere, ckpt / "config.json")
    with pytest.raises(LmlabError, match="config.json leads outside the checkpoint folder"):
        lmlab.load(ckpt)


def test_a_hugging_face_config_with_a_string_field_names_the_file(tmp_path):
    transformers = pytest.importorskip("transformers")
    from helpers import bpe_tokenizer

    tok = bpe_tokenizer()
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=tok.get_vocab_size(), n_positions=32)
    folder = tmp_path / "hf"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    raw = json.loads((folder / "config.json").read_text())
    for field, value, named in (("n_layer", "1", "n_layer must be an int, not '1'"), ("n_head", 0, "n_head must be positive")):
        (folder / "config.json").write_text(json.dumps({**raw, field: value}))
        with pytest.raises(LmlabError) as e:
            lmlab.load(folder)
        assert f"{folder}/config.json does not describe a valid gpt2 model" in str(e.value) and named in str(e.value)


def test_a_binary_file_as_data_is_named_as_binary(tmp_path):
    from lmlab.data import load_corpus
    from lmlab.tokenizer import train_char_tokenizer

    f = tmp_path / "image.bin"
    f.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with pytest.raises(LmlabError, match=r"image.bin looks like a binary file, not text \(a NUL byte at byte 8\)"):
        load_corpus(f, train_char_tokenizer(["abc"]), use_cache=False)


def test_a_read_only_disk_is_one_line_and_keeps_the_checkpoint(small_disk):
    """Root ignores file modes, so the test makes the whole disk read-only instead."""
    import subprocess

    from helpers import char_tokenizer

    tok = char_tokenizer()
    model = tiny_model(tok.get_vocab_size(), d_model=16)
    run = RunDir(small_disk / "run")
    run.save(1, lambda d: write_checkpoint(d, model, tok, {"step": 1}))
    r = subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot remount the tmpfs read-only here ({r.stderr.strip()})")
    with pytest.raises(LmlabError, match=r"cannot write a checkpoint in .*Read-only file system.*the last checkpoint is unchanged"):
        run.save(2, lambda d: write_checkpoint(d, model, tok, {"step": 2}))
    assert lmlab.load(run.root).generation_config["step"] == 1
    out = run_lmlab("train", "--data", "builtin", "--out", str(small_disk / "new"), "--steps", "1", check_rc=2)
    assert _one_error_line(out).startswith("lmlab: error: cannot create --out")


def test_export_under_a_file_is_one_line(tmp_path):
    gpt2 = tiny_checkpoint(tmp_path / "gpt2", norm="layernorm", gated_mlp=False, activation="gelu_new",
                           mlp_bias=True, qkv_bias=True, proj_bias=True, norm_bias=True)
    (tmp_path / "afile").write_text("x")
    line = _one_error_line(run_lmlab("export", str(gpt2), "--out", str(tmp_path / "afile" / "sub"), check_rc=2))
    assert "cannot create --out" in line and "afile/sub" in line


def test_a_huge_prompt_is_cropped_before_tokenizing(ckpt):
    """A 32-token model reads only its last 32 tokens: a 20M-character prompt must not be
    tokenized whole (~8 GB); the ids are those of its tail, as the model would see them."""
    import time

    m = lmlab.load(ckpt)
    tail = "the quick brown fox. " * 200
    start = time.perf_counter()
    ids = m.encode("x" * 20_000_000 + tail)
    assert time.perf_counter() - start < 5
    assert ids[-32:] == m.encode(tail)[-32:]


# --------------------------------------------------------------------------- found by a review
def test_a_stored_min_length_with_the_callers_larger_max_is_valid():
    from lmlab.generate import GenerationConfig

    cfg = GenerationConfig.from_dict({"min_new_tokens": 300}, where="x/generation_config.json", max_new_tokens=500)
    assert (cfg.min_new_tokens, cfg.max_new_tokens) == (300, 500)
    with pytest.raises(LmlabError, match=r"^min_new_tokens \(300\) is larger than max_new_tokens \(200\)"):
        GenerationConfig.from_dict({}, where="x/generation_config.json", min_new_tokens=300)


def test_a_time_budget_in_seconds_from_python_is_accepted(tmp_path, corpus_path):
    from lmlab.training.run import train_config

    cfg, _ = train_config(data=str(corpus_path), out=str(tmp_path / "o"), time=60)
    assert cfg.time == 60


def test_an_uncached_corpus_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    from lmlab.data import load_corpus
    from lmlab.tokenizer import train_char_tokenizer

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    f = tmp_path / "c.txt"
    f.write_text("hello world\n" * 50)
    corpus = load_corpus(f, train_char_tokenizer(["hello world\n"]), use_cache=False)
    assert len(corpus.ids) == 600 and list(scratch.iterdir()) == []
