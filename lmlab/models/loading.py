"""A model's files: write a checkpoint folder, read one back, check that weights fit.

``config.json`` (the model config plus lmlab's marker and the weights' SHA-256),
``model.safetensors``, ``tokenizer.json`` and ``generation_config.json``, never pickle.
The storage underneath (atomic step folders, fsync) is :mod:`lmlab.checkpoint`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

from lmlab.checkpoint import (
    FORMAT,
    MODEL_FILES,
    fsync_dir,
    fsync_write,
    model_tensors,
    read_json,
    save_safetensors,
    sha256_file,
    unwrap,
)
from lmlab.errors import LmlabError
from lmlab.models import build_model
from lmlab.models.base import LanguageModel
from lmlab.models.config import ModelConfig, config_from_dict, config_to_dict
from lmlab.runtime import resolve_device, resolve_dtype


def write_checkpoint(
    folder: str | Path,
    model: nn.Module,
    tokenizer: Tokenizer,
    generation_config: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
    state_tensors: dict[str, torch.Tensor] | None = None,
    target_tokenizer: Tokenizer | None = None,
) -> Path:
    """Write a complete checkpoint into ``folder`` (which must not exist yet); an
    encoder-decoder with its own target vocabulary also gets ``target_tokenizer.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    cfg: ModelConfig = unwrap(model).config
    save_safetensors(model_tensors(model), folder / "model.safetensors", metadata={"format": "pt"})
    meta = {"format": FORMAT, "model_sha256": sha256_file(folder / "model.safetensors")}
    fsync_write(folder / "config.json", json.dumps({"lmlab": meta, **config_to_dict(cfg)}, indent=2))
    fsync_write(folder / "tokenizer.json", tokenizer.to_str(pretty=True))
    if target_tokenizer is not None:
        fsync_write(folder / "target_tokenizer.json", target_tokenizer.to_str(pretty=True))
    fsync_write(folder / "generation_config.json", json.dumps(generation_config or {}, indent=2))
    if trainer_state is not None:
        save_safetensors(state_tensors or {}, folder / "training_state.safetensors")
        fsync_write(folder / "trainer_state.json", json.dumps(trainer_state, indent=2))
    fsync_dir(folder)
    return folder


def is_lmlab_checkpoint(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "lmlab" in json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # damaged: let read_checkpoint explain


def read_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, dict]:
    """Config, weights, tokenizer and generation config of an lmlab checkpoint, checked.

    A training run's folder reaches its files through links into ``.ckpt/latest``, which a
    save swaps atomically; the folder is resolved to one step folder *once*, and every file
    is read from it, so a reader racing a save sees one checkpoint whole, never a config of
    one step with the weights of the next.
    """
    p = Path(path)
    if not p.exists():
        raise LmlabError(f"checkpoint {path} does not exist")
    if not p.is_dir():
        raise LmlabError(f"checkpoint {path} is a file; give the checkpoint's folder")
    for _ in range(10):
        folder = step_folder(p)
        try:
            return _read_folder(folder, path)
        except (LmlabError, OSError, RuntimeError) as e:
            # A save that finished while we read removes the old step folder (torch and
            # safetensors report the vanished file as RuntimeError): if `latest` moved, read
            # the new one; otherwise the error is about the checkpoint itself.
            if folder == p or step_folder(p) == folder:
                if isinstance(e, OSError):
                    raise LmlabError(f"cannot read checkpoint {path} ({e.strerror or e}: {e.filename})") from None
                raise
    return _read_folder(step_folder(p), path)


def _read_folder(p: Path, path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, dict]:
    from lmlab.models.limits import check_fits_in_memory
    from lmlab.tokenizer import load_tokenizer

    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (p / f).is_file()]
    if missing:
        found = sorted(x.name for x in p.iterdir() if not x.name.startswith("."))
        hint = ""
        if "model.safetensors" in missing and any(f.endswith((".bin", ".pt", ".pth")) for f in found):
            hint = "; lmlab loads only safetensors, never pickle"
        raise LmlabError(
            f"checkpoint {path} has no {', '.join(missing)} (found: {', '.join(found) or 'nothing'}){hint}"
        )
    outside = [f for f in MODEL_FILES if (p / f).exists() and not _inside(p, p / f)]
    if outside:
        raise LmlabError(
            f"{path}/{outside[0]} leads outside the checkpoint folder (to {(p / outside[0]).resolve()}); "
            "a checkpoint's files must lie inside it: copy the file in"
        )
    raw = read_json(p / "config.json", "config")
    marker = raw.get("lmlab", {})
    if not isinstance(marker, dict):
        raise LmlabError(f"{path}/config.json: the field lmlab must be an object, not {marker!r}")
    if isinstance(marker.get("format", FORMAT), int) and marker.get("format", FORMAT) > FORMAT:
        raise LmlabError(
            f"{path} was written by a newer lmlab (checkpoint format {marker['format']}; this lmlab reads "
            f"format {FORMAT} and older): upgrade lmlab to load it"
        )
    cfg = config_from_dict(raw, where=f"{path}/config.json")
    check_fits_in_memory(cfg, f"{path}/config.json")
    weights = p / "model.safetensors"
    expect = marker.get("model_sha256")
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
    if not (p / "config.json").exists():  # removed while we read: an optional file may have looked absent
        raise FileNotFoundError(2, "the checkpoint folder was removed while it was read", str(p))
    return cfg, tensors, tok, gen


def _inside(folder: Path, f: Path) -> bool:
    """``f`` lies inside ``folder`` once links are followed (a run folder's top-level links
    lead into its own ``.ckpt``): a checkpoint must not be a way to read other files."""
    root, real = folder.resolve(), f.resolve()
    return real.is_relative_to(root) or real.is_relative_to(folder.absolute())


def step_folder(p: Path) -> Path:
    """The one folder a checkpoint's files are read from: a run folder's current step
    folder (``.ckpt/latest``, resolved now), or the folder itself."""
    latest = p / ".ckpt" / "latest"
    if latest.is_symlink() and (p / "config.json").is_symlink():
        for _ in range(5):  # a save may swap the link and remove the old folder as we follow it
            try:
                target = latest.resolve(strict=True)
                break
            except (OSError, RuntimeError):
                continue
        else:  # a loop of links, or a step folder that is gone
            raise LmlabError(
                f"{p}/.ckpt/latest does not lead to a step folder (it points to {os.readlink(latest)!r}); "
                f"point it at one of the folders in {p}/.ckpt (e.g. `ln -sfn step-00000500 {p}/.ckpt/latest`) "
                "or load one of them directly"
            ) from None
        if target.is_dir():
            return target
    return p


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


# --------------------------------------------------------------------------- building
@dataclass
class ModelParts:
    """What loading a model yields before the public API wraps it: the module, its
    tokenizer, its generation settings and where it came from. The Hugging Face importer
    returns the same parts, so :func:`lmlab.load` wraps both alike."""

    module: LanguageModel
    tokenizer: Tokenizer
    generation_config: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    #: an encoder-decoder's target tokenizer when it differs from the source's (Marian)
    target_tokenizer: Any = None


def reinit_buffers(module: nn.Module) -> None:
    """Non-persistent buffers (RoPE and sinusoidal tables) are not in the checkpoint:
    rebuild them by constructing the small table modules again on the CPU."""
    from lmlab.nn.positional import RotaryEmbedding, SinusoidalPositions, sinusoidal_table

    for m in module.modules():
        if isinstance(m, RotaryEmbedding):
            fresh = RotaryEmbedding(m.rotary_dim, m.cos.shape[0], m.base)
            m.inv_freq, m.cos, m.sin = fresh.inv_freq, fresh.cos, fresh.sin
        elif isinstance(m, SinusoidalPositions):
            m.table = sinusoidal_table(*m.table.shape, getattr(m, "layout", "interleaved"))


def build_from_weights(cfg: ModelConfig, tensors: dict[str, torch.Tensor], source: str) -> LanguageModel:
    """The model ``cfg`` describes, holding ``tensors``, built without a random init first
    (on the meta device, then allocated uninitialised and filled: memory ≈ the weights once)."""
    with torch.device("meta"):
        module = build_model(cfg)
    module = module.to_empty(device="cpu")  # allocate, uninitialised: the weights come next
    if hasattr(module, "tie_weights"):
        module.tie_weights()  # to_empty gives each parameter its own storage
    reinit_buffers(module)
    load_weights(module, tensors, source)
    return module


def load_checkpoint(
    path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None
) -> ModelParts:
    """An lmlab checkpoint folder as :class:`ModelParts` (float32 on the CPU by default)."""
    cfg, tensors, tok, gen = read_checkpoint(path)
    dev = resolve_device(device) if device is not None else torch.device("cpu")
    module = build_from_weights(cfg, tensors, str(path))
    module = module.to(device=dev, dtype=resolve_dtype(dtype) or torch.float32)
    target = read_target_tokenizer(path)
    tv = getattr(cfg, "target_vocab_size", None)
    if target is None and tv is not None and tv != tok.get_vocab_size():
        raise LmlabError(
            f"{path} is an encoder-decoder with its own target vocabulary but has no target_tokenizer.json; "
            "copy that file back from where the checkpoint was trained"
        )
    return ModelParts(module, tok, gen, str(path), target_tokenizer=target)


def read_target_tokenizer(path: str | Path) -> Tokenizer | None:
    """An encoder-decoder's target tokenizer (``target_tokenizer.json``), None when the model
    has one vocabulary. (A run's tokenizers are the same at every step: no race with a save.)"""
    from lmlab.tokenizer import load_tokenizer

    f = step_folder(Path(path)) / "target_tokenizer.json"
    return load_tokenizer(f) if f.is_file() else None
