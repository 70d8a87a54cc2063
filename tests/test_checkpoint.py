"""Checkpoints: the run folder's link layout, atomic saves that survive SIGKILL, and a
clear error (never a traceback) for every way a checkpoint on disk can be damaged.

Each saved "version" v of a model has every parameter equal to v, so a load that mixed
two saves (old config with new weights, half of one file and half of another) shows up
as weights that are not one constant, or a constant that disagrees with the version
stamped into generation_config.json.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from helpers import cli_env, lmlab_cmd, popen
from safetensors import safe_open
from torch import nn

import lmlab
from lmlab.checkpoint import RunDir, model_tensors
from lmlab.errors import LmlabError
from lmlab.models import build_model
from lmlab.models.config import TransformerConfig
from lmlab.models.loading import write_checkpoint
from lmlab.tokenizer import train_char_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog.\nPACK MY BOX WITH FIVE DOZEN LIQUOR JUGS!\n" * 20


def tiny_model(version: float | None = None, **overrides: int) -> nn.Module:
    """A 2-layer Transformer; with ``version``, every parameter is set to that constant."""
    tok = train_char_tokenizer([TEXT])
    kw = dict(vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, d_model=32, max_seq_len=32)
    kw.update(overrides)
    model = build_model(TransformerConfig(**kw))
    if version is not None:
        set_version(model, version)
    return model


def set_version(model: nn.Module, version: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(version))


def loaded_version(path: Path) -> float:
    """Load through the public API and return the one constant all weights share."""
    m = lmlab.load(path)
    values = torch.cat([p.detach().flatten() for p in m.module.parameters()]).unique()
    assert values.numel() == 1, f"{path}: weights mix several saves: {values.tolist()[:5]}"
    v = float(values.item())
    assert m.generation_config.get("version") == v, "weights and generation_config come from different saves"
    return v


def checkpoint_writer(model: nn.Module, version: float):
    """A ``RunDir.save`` write function for a full checkpoint stamped with ``version``."""
    tok = train_char_tokenizer([TEXT])

    def write(folder: Path) -> None:
        write_checkpoint(folder, model, tok, {"version": version}, {"step": int(version)}, {})

    return write


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A fresh, valid checkpoint folder (as ``Model.save`` writes it)."""
    folder = tmp_path / "ckpt"
    write_checkpoint(folder, tiny_model(), train_char_tokenizer([TEXT]), {"eos_token_id": 0})
    return folder


# --------------------------------------------------------------------------- format
def test_saved_tensor_names_are_independent_of_wrapping(tmp_path: Path) -> None:
    """torch.compile wraps a model as ``_orig_mod`` (DDP as ``module``): the file must hold
    the bare names, so a checkpoint loads whatever wrapped the model that trained it."""

    class Compiled(nn.Module):  # the shape of torch._dynamo's OptimizedModule
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self._orig_mod = m

    bare = tiny_model()
    wrapped = Compiled(bare)
    assert all(k.startswith("_orig_mod.") for k in wrapped.state_dict())  # the trap is real
    write_checkpoint(tmp_path / "c", wrapped, train_char_tokenizer([TEXT]))
    with safe_open(str(tmp_path / "c" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert names == set(model_tensors(bare))
    assert not any(n.startswith(("module.", "_orig_mod.")) for n in names)
    # Tied weights are stored once; loading re-ties them.
    m = lmlab.load(tmp_path / "c")
    for name, t in bare.state_dict().items():
        torch.testing.assert_close(m.module.state_dict()[name], t, rtol=0, atol=0)
    assert not [p for p in (tmp_path / "c").iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]


# --------------------------------------------------------------------------- RunDir
def _marker_writer(step: int):
    def write(folder: Path) -> None:
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"step": step}))

    return write


def _top(root: Path) -> int:
    return json.loads((root / "config.json").read_text())["step"]


def test_rundir_latest_best_and_pruning(tmp_path: Path) -> None:
    root = tmp_path / "run"
    run = RunDir(root)
    assert not run.has_checkpoint()
    run.save(10, _marker_writer(10))
    assert run.has_checkpoint() and _top(root) == 10
    run.save(20, _marker_writer(20), best=True)
    run.save(30, _marker_writer(30))
    # another process's half-written save, killed long ago, is cleaned up on the next save
    (run.store / ".tmp-step-00000035-999999").mkdir()
    run.save(40, _marker_writer(40))

    assert _top(root) == 40  # the top level follows `latest`
    assert os.readlink(run.store / "latest") == "step-00000040"
    assert (root / "config.json").is_symlink()
    assert json.loads((root / "best" / "config.json").read_text())["step"] == 20
    # only the folders `latest` and `best` point to survive
    assert sorted(p.name for p in run.store.iterdir()) == ["latest", "step-00000020", "step-00000040"]

    run.save(50, _marker_writer(50), best=True)  # a new best moves the link; step 20 goes
    assert json.loads((root / "best" / "config.json").read_text())["step"] == 50
    assert sorted(p.name for p in run.store.iterdir()) == ["latest", "step-00000050"]

    run.clear()
    assert not run.has_checkpoint()
    assert not [p for p in root.iterdir()]


def test_rundir_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.save(7, _marker_writer(7), best=True)

    def write_again(folder: Path) -> None:
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"step": 7, "again": True}))

    run.save(7, write_again)
    assert json.loads((run.root / "config.json").read_text()) == {"step": 7, "again": True}
    assert (run.root / "best" / "config.json").is_file()
    assert not [p for p in run.store.iterdir() if p.name.startswith(".")]


class _Crash(BaseException):
    """Stands for the process dying at that instant."""


@pytest.mark.parametrize("same_step", [False, True], ids=["new-step", "same-step"])
def test_a_crash_between_any_two_renames_leaves_old_or_new(tmp_path: Path, monkeypatch, same_step) -> None:
    """Cut a save short before each of its renames in turn: the folder must always load,
    as the previous save or the new one. (The SIGKILL test below hits random instants;
    this one hits every rename boundary deterministically.)"""
    real_replace = os.replace
    model = tiny_model()
    completed = False
    k = 0
    while not completed:
        k += 1
        assert k < 20, "a save should need only a few renames"
        root = tmp_path / f"run{k}"
        run = RunDir(root)
        set_version(model, 1)
        run.save(1, checkpoint_writer(model, 1), best=True)
        calls = 0

        def crashing_replace(src, dst, crash_at=k):
            nonlocal calls
            calls += 1
            if calls == crash_at:
                raise _Crash
            return real_replace(src, dst)

        set_version(model, 2)
        monkeypatch.setattr(os, "replace", crashing_replace)
        try:
            run.save(1 if same_step else 2, checkpoint_writer(model, 2))
            completed = True
        except _Crash:
            pass
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
        v = loaded_version(root)
        assert v in ((2,) if completed else (1, 2)), f"crash before rename {k}: loaded version {v}"
        assert loaded_version(root / "best") == 1
        # the next save in a new process works and wins
        set_version(model, 3)
        RunDir(root).save(3, checkpoint_writer(model, 3))
        assert loaded_version(root) == 3


_SAVER = textwrap.dedent(
    """
    import os, sys
    import torch
    torch.set_num_threads(1)  # single-threaded, so fork() below is safe
    from lmlab.checkpoint import RunDir
    from lmlab.models.loading import write_checkpoint
    from lmlab.models.config import TransformerConfig
    from lmlab.models import build_model
    from lmlab.tokenizer import train_char_tokenizer

    tok = train_char_tokenizer(["abcdefghijklmnopqrstuvwxyz"])
    cfg = TransformerConfig(vocab_size=tok.get_vocab_size(), n_layer=4, n_head=4, d_model=192)
    model = build_model(cfg)  # ~1.8M parameters: each save writes ~7 MB and fsyncs it
    run = RunDir(sys.argv[1])
    for line in sys.stdin:  # "go V": fork a child that saves V, V+1, ... until killed
        cmd, arg = line.split()
        if cmd == "go":
            pid = os.fork()
            if pid == 0:
                v = int(arg)
                while True:
                    with torch.no_grad():
                        for p in model.parameters():
                            p.fill_(float(v))
                    write = lambda f: write_checkpoint(f, model, tok, {"version": float(v)}, {"step": v}, {})
                    run.save(v, write, best=v % 3 == 0)
                    print("saved", v, flush=True)
                    v += 1
            print("child", pid, flush=True)
        elif cmd == "reap":
            os.waitpid(int(arg), 0)
            print("reaped", arg, flush=True)
    """
)


def test_sigkill_during_repeated_saves_never_leaves_a_mix(tmp_path: Path) -> None:
    """A process saving in a loop is SIGKILLed at random instants (mostly mid-save, since
    saving is all it does); after each kill the folder loads as the last completed save
    or the one in flight, whole."""
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    root = tmp_path / "run"
    env = cli_env()
    proc = subprocess.Popen(
        [sys.executable, str(script), str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()

    def next_line() -> list[str]:
        try:
            return lines.get(timeout=60).split()
        except queue.Empty:
            proc.kill()
            raise AssertionError("the saver subprocess stopped answering") from None

    rng = random.Random(1234)
    start = 1
    try:
        for _ in range(6):
            proc.stdin.write(f"go {start}\n")
            proc.stdin.flush()
            child, last_saved = None, None
            while child is None or last_saved is None:
                kind, arg = next_line()
                if kind == "child":
                    child = int(arg)
                elif kind == "saved":
                    last_saved = int(arg)
            threading.Event().wait(rng.uniform(0.0, 0.12))
            os.kill(child, signal.SIGKILL)
            proc.stdin.write(f"reap {child}\n")
            proc.stdin.flush()
            while (msg := next_line())[0] != "reaped":
                if msg[0] == "saved":
                    last_saved = int(msg[1])
            v = loaded_version(root)
            # the kill may land after the swap but before the child reported it
            assert v in (last_saved, last_saved + 1), f"loaded {v}, last reported save {last_saved}"
            if (root / "best").exists():
                assert loaded_version(root / "best") % 3 == 0
            start = int(v) + 2  # versions never repeat
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert proc.returncode == 0


# --------------------------------------------------------------------------- damage
def _corrupt(folder: Path, how: str) -> None:
    cfg_path = folder / "config.json"
    weights = folder / "model.safetensors"
    if how == "no-config":
        cfg_path.unlink()
    elif how == "no-weights":
        weights.unlink()
    elif how == "bin-instead":
        weights.rename(folder / "pytorch_model.bin")
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "truncated-no-checksum":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        cfg = json.loads(cfg_path.read_text())
        del cfg["lmlab"]["model_sha256"]
        cfg_path.write_text(json.dumps(cfg))
    elif how == "flipped-byte":
        data = bytearray(weights.read_bytes())
        data[-7] ^= 0x40  # inside the last tensor's data: still parses, silently wrong
        weights.write_bytes(bytes(data))
    elif how == "shape-mismatch":
        cfg = json.loads(cfg_path.read_text())
        cfg["d_model"] = 48
        cfg_path.write_text(json.dumps(cfg))
    elif how == "layer-mismatch":
        cfg = json.loads(cfg_path.read_text())
        cfg["n_layer"] = 3
        cfg_path.write_text(json.dumps(cfg))
    elif how == "config-not-json":
        cfg_path.write_text('{"lmlab": {"format": 1}, "d_model": 3')  # cut mid-write
    elif how == "no-tokenizer":
        (folder / "tokenizer.json").unlink()
    elif how == "tokenizer-not-json":
        (folder / "tokenizer.json").write_text("{ not json")
    else:  # pragma: no cover
        raise ValueError(how)


CORRUPTIONS = {
    "no-config": r"has no config\.json",
    "no-weights": r"has no model\.safetensors",
    "bin-instead": r"pytorch_model\.bin.*only safetensors",
    "truncated": r"model\.safetensors is corrupted or truncated",
    "truncated-no-checksum": r"model\.safetensors is truncated or corrupted",
    "flipped-byte": r"model\.safetensors is corrupted.*checksum",
    "shape-mismatch": r"do not match its config\.json: .*shape",
    "layer-mismatch": r"do not match its config\.json: missing blocks\.2\.",
    "config-not-json": r"config\.json is damaged or not JSON",
    "no-tokenizer": r"has no tokenizer\.json",
    "tokenizer-not-json": r"tokenizer\.json",
}


def test_a_valid_checkpoint_loads(ckpt: Path) -> None:
    """The control for the damage tests below: the same folder, undamaged, loads."""
    m = lmlab.load(ckpt)
    assert isinstance(m.generate("the ", max_new_tokens=3, temperature=0), str)


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_damaged_checkpoint_gives_a_clear_error(ckpt: Path, how: str) -> None:
    _corrupt(ckpt, how)
    with pytest.raises(LmlabError, match=CORRUPTIONS[how]) as e:
        lmlab.load(ckpt)
    assert "\n" not in str(e.value)


def test_cli_reports_damage_in_one_line(tmp_path: Path) -> None:
    """``lmlab generate`` on damaged checkpoints: one ``lmlab: error:`` line, exit 2."""
    kinds = ["truncated", "config-not-json", "shape-mismatch"]
    procs = {}
    for how in kinds:
        folder = tmp_path / how
        write_checkpoint(folder, tiny_model(), train_char_tokenizer([TEXT]))
        _corrupt(folder, how)
        procs[how] = popen(lmlab_cmd("generate", str(folder), "--prompt", "x"))
    for how, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2, (how, err)
        assert "Traceback" not in err and out == "", (how, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lmlab: error: "), (how, err)


def test_checkpoint_files_follow_the_umask(tmp_path: Path) -> None:
    """safetensors writes 0600 on its own; the checkpoint's tensors get the mode the JSON
    files get (0666 less the umask), so a model shared on a machine is readable."""
    tok = train_char_tokenizer([TEXT])
    old = os.umask(0o022)
    try:
        folder = write_checkpoint(tmp_path / "c", tiny_model(), tok, trainer_state={"step": 1})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o644
    assert modes["training_state.safetensors"] == 0o644
