"""Checkpoints: ``config.json`` + ``model.safetensors`` + ``tokenizer.json`` +
``generation_config.json`` (+ the training state), never pickle.

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
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn

from lmlab.config import ModelConfig, config_from_dict, config_to_dict
from lmlab.errors import LmlabError

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")
STATE_FILES = ("trainer_state.json", "training_state.safetensors")
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


def _fsync_write(path: Path, data: bytes | str) -> None:
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


def _fsync_dir(path: Path) -> None:
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


def write_checkpoint(
    folder: str | Path,
    model: nn.Module,
    tokenizer: Tokenizer,
    generation_config: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
    state_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete checkpoint into ``folder`` (which must not exist yet)."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    cfg: ModelConfig = unwrap(model).config
    save_safetensors(model_tensors(model), folder / "model.safetensors", metadata={"format": "pt"})
    meta = {"format": FORMAT, "model_sha256": sha256_file(folder / "model.safetensors")}
    _fsync_write(folder / "config.json", json.dumps({"lmlab": meta, **config_to_dict(cfg)}, indent=2))
    _fsync_write(folder / "tokenizer.json", tokenizer.to_str(pretty=True))
    _fsync_write(folder / "generation_config.json", json.dumps(generation_config or {}, indent=2))
    if trainer_state is not None:
        save_safetensors(state_tensors or {}, folder / "training_state.safetensors")
        _fsync_write(folder / "trainer_state.json", json.dumps(trainer_state, indent=2))
    _fsync_dir(folder)
    return folder


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
        self.store.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:08d}"
        tmp = self.store / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        # Re-saving a step (e.g. a resumed run saving its first step again) takes a fresh
        # name: moving the old folder aside first would leave `latest` (and `best`)
        # pointing at nothing until the second rename. The old folder is pruned below.
        k = 0
        while (self.store / name).exists():
            k += 1
            name = f"step-{step:08d}.{k}"
        final = self.store / name
        os.replace(tmp, final)
        # The fixed top-level links are made once, before the first `latest` exists:
        # until then they dangle, so a kill in between leaves no half-made checkpoint.
        for f in (*MODEL_FILES, *STATE_FILES):
            link = self.root / f
            if not link.is_symlink():
                if link.exists():
                    link.unlink()
                link.symlink_to(Path(".ckpt") / "latest" / f)
        self._swap_link(self.store / "latest", name)
        _fsync_dir(self.store)
        if best:
            self._swap_link(self.root / "best", Path(".ckpt") / name)
        self._prune()
        return final

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

    def clear(self) -> None:
        """Remove a previous run's checkpoints and logs (``--overwrite``)."""
        for f in (*MODEL_FILES, *STATE_FILES, "best", "metrics.jsonl", "loss.png"):
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


def is_lmlab_checkpoint(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "lmlab" in json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # damaged: let read_checkpoint explain


def read_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, dict]:
    """Config, weights, tokenizer and generation config of an lmlab checkpoint, checked."""
    from lmlab.tokenizer import load_tokenizer

    p = Path(path)
    if not p.exists():
        raise LmlabError(f"checkpoint {path} does not exist")
    if not p.is_dir():
        raise LmlabError(f"checkpoint {path} is a file; give the checkpoint's folder")
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (p / f).is_file()]
    if missing:
        found = sorted(x.name for x in p.iterdir() if not x.name.startswith("."))
        hint = ""
        if "model.safetensors" in missing and any(f.endswith((".bin", ".pt", ".pth")) for f in found):
            hint = "; lmlab loads only safetensors, never pickle"
        raise LmlabError(
            f"checkpoint {path} has no {', '.join(missing)} (found: {', '.join(found) or 'nothing'}){hint}"
        )
    raw = read_json(p / "config.json", "config")
    cfg = config_from_dict(raw)
    weights = p / "model.safetensors"
    expect = raw.get("lmlab", {}).get("model_sha256")
    if expect and sha256_file(weights) != expect:
        raise LmlabError(
            f"{weights} is corrupted or truncated (its checksum does not match config.json); "
            "use another checkpoint (e.g. best/) or retrain"
        )
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise LmlabError(
            f"{weights} is truncated or corrupted ({e}); use another checkpoint or retrain"
        ) from None
    tok = load_tokenizer(p / "tokenizer.json")
    gen = (
        read_json(p / "generation_config.json", "generation config")
        if (p / "generation_config.json").is_file()
        else {}
    )
    return cfg, tensors, tok, gen


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy tensors into a model, naming any tensor that is missing, extra or misshapen."""
    model = unwrap(model)
    if hasattr(model, "check_weights"):
        model.check_weights(tensors, source)  # a model may name a mismatch better (RNN families)
    expected = model_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        raise LmlabError(f"the weights in {source} do not match its config.json: {'; '.join(parts)}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise LmlabError(
                f"the weights in {source} do not match its config.json: {name} has shape "
                f"{tuple(t.shape)}, the config implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict(tensors, strict=False)
