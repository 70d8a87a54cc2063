"""Checkpoint storage: atomic step folders, fsync'ed files, JSON that is checked.

What goes into a checkpoint (``config.json`` + ``model.safetensors`` + ``tokenizer.json``
+ ``generation_config.json``, + the training state) is written and read by
:mod:`lmlab.models.loading`; this module knows files, not models, so every layer can
use it.

Atomicity. A training run's ``--out DIR`` holds the latest checkpoint at its top
level, but those top-level names are symbolic links into ``DIR/.ckpt/latest/``, and
``.ckpt/latest`` is itself a link to a complete step folder (``.ckpt/step-000200``).
A save writes a whole new step folder (every file fsync'ed), then swaps the one
``latest`` link with ``os.replace`` — a single atomic rename. A SIGKILL at any instant
therefore leaves either the old or the new checkpoint, whole, never a mix.
``DIR/best`` is a link to the step folder with the best validation loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from lmlab.errors import LmlabError

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")
STATE_FILES = ("trainer_state.json", "training_state.safetensors")
#: files a checkpoint has only for some models (an encoder-decoder with its own target vocabulary)
OPTIONAL_FILES = ("target_tokenizer.json",)
FORMAT = 1


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to save: tied weights once, clean names, contiguous CPU tensors."""
    model = unwrap(model)
    seen: dict[int, str] = {}
    out = {}
    for name, t in model.state_dict().items():
        key = t.data_ptr()
        if key in seen and t.numel() > 0:
            continue  # a tied weight (lm_head = tok_emb): saved once under its first name
        seen[key] = name
        out[name] = t.detach().to("cpu").contiguous()
    return out


def fsync_write(path: Path, data: bytes | str) -> None:
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(path, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, then the file mode every other file gets (0666 less
    the umask: safetensors writes 0600, which hides a shared model from the other users of
    a machine), then fsync: complete on disk before anything points to it."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())
    _fsync_file(path)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (setting it to
    read it back would, for an instant, let another thread create world-writable files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- run folders
class RunDir:
    """A training run's ``--out`` folder: the latest checkpoint at the top, ``best/``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.store = self.root / ".ckpt"

    def has_checkpoint(self) -> bool:
        return (self.root / "config.json").exists() or (self.store / "latest").exists()

    def save(self, step: int, write: Any, best: bool = False) -> Path:
        """``write(folder)`` fills a new folder; then it becomes ``latest`` atomically."""
        name = f"step-{step:08d}"
        tmp = self.store / f".tmp-{name}-{os.getpid()}"
        try:
            self.store.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            write(tmp)
        except (OSError, SafetensorError) as e:
            shutil.rmtree(tmp, ignore_errors=True)  # the last whole checkpoint stays as it was
            raise LmlabError(save_failure(self.root, _as_os_error(e))) from None
        # Re-saving a step (e.g. a resumed run saving its first step again) takes a fresh
        # name: moving the old folder aside first would leave `latest` (and `best`)
        # pointing at nothing until the second rename. The old folder is pruned below.
        k = 0
        while (self.store / name).exists():
            k += 1
            name = f"step-{step:08d}.{k}"
        final = self.store / name
        try:
            self._publish(tmp, final, best)
        except OSError as e:  # the links could not be made: `latest` still names the last whole step
            shutil.rmtree(tmp, ignore_errors=True)
            raise LmlabError(save_failure(self.root, e)) from None
        return final

    def _publish(self, tmp: Path, final: Path, best: bool) -> None:
        os.replace(tmp, final)
        # The fixed top-level links are made once, before the first `latest` exists:
        # until then they dangle, so a kill in between leaves no half-made checkpoint.
        for f in (*MODEL_FILES, *STATE_FILES, *(o for o in OPTIONAL_FILES if (final / o).exists())):
            link = self.root / f
            if not link.is_symlink():
                if link.exists():
                    link.unlink()
                link.symlink_to(Path(".ckpt") / "latest" / f)
        self._swap_link(self.store / "latest", final.name)
        fsync_dir(self.store)
        if best:
            self._swap_link(self.root / "best", Path(".ckpt") / final.name)
        self._prune()

    def _swap_link(self, link: Path, target: str | Path) -> None:
        tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(target)
        os.replace(tmp, link)  # atomic: the link points at the old or the new folder

    def _prune(self) -> None:
        """Keep the folders ``latest`` and ``best`` point to; remove the rest."""
        keep = set()
        for link in (self.store / "latest", self.root / "best"):
            if link.is_symlink():
                keep.add(Path(os.readlink(link)).name)
        for d in self.store.iterdir():
            if d.name in keep or d.name == "latest":
                continue
            if d.is_symlink():
                continue
            if d.name.startswith(".tmp-") and d.name.endswith(f"-{os.getpid()}"):
                continue
            shutil.rmtree(d, ignore_errors=True)

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove half-written step folders (``.ckpt/.tmp-*``) that a killed or failed save
        left (a full disk, a SIGKILL mid-save). Call it holding the run's :class:`RunLock`:
        then no other process can be writing one."""
        gone = []
        if self.store.is_dir():
            for d in self.store.iterdir():
                if d.name.startswith(".tmp-") and not d.is_symlink():
                    shutil.rmtree(d, ignore_errors=True)
                    gone.append(d)
        return gone

    def clear(self) -> None:
        """Remove a previous run's checkpoints and logs (``--overwrite``)."""
        for f in (*MODEL_FILES, *STATE_FILES, *OPTIONAL_FILES, "best", "metrics.jsonl", "loss.png"):
            p = self.root / f
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)
        shutil.rmtree(self.store, ignore_errors=True)


# --------------------------------------------------------------------------- reading
def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmlabError(f"{what} {path} is damaged or not JSON ({e}); restore it or retrain") from None
    if not isinstance(d, dict):
        raise LmlabError(f"{what} {path} should hold a JSON object")
    return d


def _as_os_error(e: Exception) -> OSError:
    """safetensors reports the system's error as text ("... (os error 28)"): recover it."""
    if isinstance(e, OSError):
        return e
    m = re.search(r"os error (\d+)", str(e))
    code = int(m.group(1)) if m else 0
    return OSError(code, os.strerror(code) if code else str(e))


def save_failure(root: Path, e: OSError) -> str:
    """One line for a save that the system refused: what, where, and what to do."""
    import errno

    last = "the last checkpoint is unchanged" if (root / ".ckpt" / "latest").exists() else "nothing was saved"
    if e.errno == errno.ENOSPC:
        free = shutil.disk_usage(root).free if root.exists() else 0
        return (
            f"no space left on the disk of {root} ({free / 2**20:,.0f} MiB free) while saving a checkpoint; "
            f"{last}; free some space, then continue with --resume {root}"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write a checkpoint in {root} ({e.strerror}); {last}; make it writable or choose another --out"
    return f"saving a checkpoint in {root} failed ({e.strerror or e}); {last}"


# --------------------------------------------------------------------------- one writer
class RunLock:
    """An exclusive lock on a run folder for as long as one process writes it.

    Two trainers on one ``--out`` would interleave ``metrics.jsonl`` and silently lose one
    run; the second must stop at once instead, naming the first. ``fcntl.flock`` on
    ``DIR/.lock``: the kernel drops the lock when its process dies (even by SIGKILL), so a
    lock left by a dead process is simply taken over. The file holds the owner's pid and
    command line, for the message.
    """

    NAME = ".lock"

    def __init__(self, root: str | Path, what: str = "lmlab") -> None:
        self.path = Path(root) / self.NAME
        self.what = what
        self._fd: int | None = None
        self.created = False

    def acquire(self) -> RunLock:
        import fcntl

        self.created = not self.path.exists()  # a failed start removes only a lock file it made
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError as e:
            raise LmlabError(f"cannot lock {self.path.parent} ({e.strerror}); check its permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = _read_owner(fd)
            os.close(fd)
            raise LmlabError(
                f"{self.path.parent} is in use by another process ({owner}); wait for it to end, "
                "or choose another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "what": self.what}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (harmless, reused)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_owner(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"pid {info['pid']}, {info['what']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"
