"""Moving tensors between a Hugging Face checkpoint and lmlab's Transformer.

Import keeps peak memory near the size of the weights. The model is built on the
``meta`` device (shapes, no storage); each lmlab tensor is then allocated once, in the
requested dtype, and filled from the memory-mapped safetensors file a few megabytes at
a time. After each piece is copied its file pages are released (``madvise``), so the
mapped file never adds a second copy of the weights to the process's memory.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import mmap
import sys
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import Tensor, nn

from lmlab.errors import LmlabError
from lmlab.hf.base import Family, Rule

CHUNK_BYTES = 16 << 20  # copy (and release) the source this much at a time


# --------------------------------------------------------------------------- page release
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


_MADVISE = _madvise()
_MADV_DONTNEED = 4


def release_pages(t: Tensor) -> None:
    """Drop the whole pages under ``t`` from this process's resident memory.

    Only for tensors backed by a *private file mapping* that nothing else uses (what
    safetensors' ``safe_open`` returns): the kernel re-reads the file if they are touched
    again, so this only frees memory. Pages shared with a neighbour tensor are kept.
    """
    if _MADVISE is None or t.numel() == 0:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # round up: keep a page shared with the previous piece
    hi = end // mmap.PAGESIZE * mmap.PAGESIZE
    if hi > lo:
        _MADVISE(lo, hi - lo, _MADV_DONTNEED)


# --------------------------------------------------------------------------- reading
class CheckpointWeights:
    """The tensors of a Hugging Face folder by name, read lazily.

    safetensors (one file, or shards listed in ``model.safetensors.index.json``) are
    memory-mapped. A pickle ``pytorch_model.bin`` is read only with ``allow_pickle``,
    through ``torch.load(weights_only=True)``, which unpickles tensors and nothing else.
    """

    def __init__(self, folder: Path, allow_pickle: bool = False) -> None:
        self.folder = folder
        self._stack = ExitStack()
        self._where: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        self._pickled: dict[str, Tensor] = {}
        self.mapped = True  # safetensors: the pages may be released after copying
        st = self._safetensors_files()
        if st:
            from safetensors import safe_open

            for f in st:
                try:
                    h = self._stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
                except Exception as e:  # the Rust side raises plain Exceptions
                    raise LmlabError(f"{f} is not a readable safetensors file ({e})") from None
                self._open[f] = h
                for k in h.keys():
                    self._where[k] = f
            return
        bins = self._pickle_files()
        found = ", ".join(sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))) or "nothing"
        if not bins:
            raise LmlabError(
                f"{folder} has no model weights (found: {found}); lmlab reads model.safetensors "
                "or sharded model-*.safetensors with model.safetensors.index.json"
            )
        if not allow_pickle:
            raise LmlabError(
                f"{folder} holds only pickle weights ({', '.join(b.name for b in bins)}); unpickling "
                "can run code hidden in the file, so lmlab refuses it. If you trust the source, pass "
                "--allow-pickle (allow_pickle=True): tensors are then read with torch.load(weights_only=True)"
            )
        self.mapped = False  # torch.load's storages may be shared (tied weights): never release
        for b in bins:
            self._pickled.update(_torch_load(b))

    def _safetensors_files(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            return self._from_index(index)
        if (self.folder / "model.safetensors").is_file():
            return [self._inside(self.folder / "model.safetensors")]
        return [self._inside(f) for f in sorted(self.folder.glob("model*.safetensors"))]

    def _pickle_files(self) -> list[Path]:
        index = self.folder / "pytorch_model.bin.index.json"
        if index.is_file():
            return self._from_index(index)
        return [self._inside(p) for p in [self.folder / "pytorch_model.bin"] if p.is_file()]

    def _inside(self, f: Path) -> Path:
        """``f``, if it lies inside the model folder once links are followed; a checkpoint
        folder must not be a way to read other files (an index naming ``/etc/passwd`` or
        ``../../secret``, a weight file that links out). A Hub cache snapshot's files link
        to the repository's own ``blobs/`` folder: those are inside it too."""
        root = self.folder.resolve()
        real = f.resolve()
        allowed = [root]
        if root.parent.name == "snapshots":  # huggingface_hub's cache: snapshots/<rev>/* -> ../../blobs/*
            allowed.append(root.parent.parent / "blobs")
        if not any(real == a or real.is_relative_to(a) for a in allowed):
            raise LmlabError(
                f"{f.name} in {self.folder} leads outside the model folder (to {real}); lmlab reads "
                "weights only from inside the folder: copy the files in, or fix the index/link"
            )
        return real

    def _from_index(self, index: Path) -> list[Path]:
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
            raise LmlabError(f"{index} is damaged ({e}); download it again") from None
        if not all(isinstance(f, str) for f in files):
            raise LmlabError(f"{index} is damaged (its weight_map values must be file names); download it again")
        outside = [f for f in files if Path(f).is_absolute() or ".." in Path(f).parts]
        if outside:
            raise LmlabError(
                f"{index.name} in {self.folder} names shards outside the model folder ({', '.join(outside)}); "
                "lmlab reads weights only from inside the folder: fix the index"
            )
        missing = [f for f in files if not (self.folder / f).is_file()]
        if missing:
            raise LmlabError(
                f"{index.name} in {self.folder} lists shards that are missing: {', '.join(missing)}; "
                "download every shard"
            )
        return [self._inside(self.folder / f) for f in files]

    def names(self) -> set[str]:
        return set(self._where) | set(self._pickled)

    def all_bf16(self) -> bool:
        """Every floating-point tensor of the checkpoint is stored in bf16 (read from the
        safetensors headers: no tensor is loaded)."""
        kinds = {t.dtype for t in self._pickled.values() if t.is_floating_point()}
        for name, f in self._where.items():
            kinds.add(self._open[f].get_slice(name).get_dtype())
        return kinds <= {torch.bfloat16, "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"}

    def get(self, name: str) -> Tensor:
        if name in self._pickled:
            return self._pickled[name]
        return self._open[self._where[name]].get_tensor(name)

    def close(self) -> None:
        self._stack.close()
        self._pickled.clear()


def _torch_load(path: Path) -> dict[str, Tensor]:
    """Tensors only (``weights_only``), memory-mapped when the file's format allows."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise LmlabError(f"{path} is not a loadable PyTorch checkpoint of tensors ({first})") from None
    if not isinstance(sd, dict):
        raise LmlabError(f"{path} does not hold a state dict (a name -> tensor mapping)")
    return {k: v for k, v in sd.items() if isinstance(v, Tensor)}


def _copy_into(dst: Tensor, src: Tensor, release: bool, what: str) -> None:
    """dst ← src (converting dtype), a slab of rows at a time, releasing each slab's pages."""
    if tuple(dst.shape) != tuple(src.shape):
        raise LmlabError(
            f"tensor {what} has shape {tuple(src.shape)}, but the checkpoint's config.json implies "
            f"{tuple(dst.shape)}; the weights do not belong to this config"
        )
    if src.dim() == 0:
        dst.copy_(src)
        return
    row = max(1, src[0].numel() * src.element_size())
    step = max(1, CHUNK_BYTES // row)
    for i in range(0, src.shape[0], step):
        piece = src[i : i + step]
        dst[i : i + step].copy_(piece)
        if release and piece.is_contiguous():
            release_pages(piece)


def _fill(dst: Tensor, rule: Rule, srcs: list[Tensor], n_head: int, head_dim: int, release: bool) -> None:
    """Build one lmlab tensor from its Hugging Face parts (see :class:`Rule` for each op)."""
    what = rule.hf[0] if len(rule.hf) == 1 else "+".join(rule.hf)
    if rule.op == "copy":
        _copy_into(dst, srcs[0], release, what)
    elif rule.op == "t":  # Conv1D (in, out) -> Linear (out, in): fill dstᵀ row by row
        _copy_into(dst.T, srcs[0], release, what)
    elif rule.op == "cat":  # [a; b; c] along dim 0
        off = 0
        for name, s in zip(rule.hf, srcs, strict=True):
            n = s.shape[0] if s.dim() else 0
            _copy_into(dst[off : off + n], s, release, name)
            off += n
        if off != dst.shape[0]:
            raise LmlabError(f"tensors {what} have {off} rows together, the config implies {dst.shape[0]}")
    elif rule.op == "heads":  # (nh, {q,k,v}, hs, ...) -> ({q,k,v}, nh, hs, ...)
        s = srcs[0]
        if s.shape[0] != 3 * n_head * head_dim:
            raise LmlabError(
                f"tensor {what} has {s.shape[0]} rows, the config implies {3 * n_head * head_dim}"
            )
        rest = tuple(s.shape[1:])
        view = dst.view(3, n_head, head_dim, *rest).transpose(0, 1)  # a view: writes land in dst
        _copy_into(view, s.view(n_head, 3, head_dim, *rest), release, what)
    elif rule.op == "plus1":  # Gemma: w_lmlab = 1 + w_hf, added in float32 as transformers does
        if tuple(dst.shape) != tuple(srcs[0].shape):
            _copy_into(dst, srcs[0], release, what)  # raises the shape error
        dst.copy_(srcs[0].float() + 1.0)
    else:  # pragma: no cover - a bug in a family's rules
        raise AssertionError(f"unknown op {rule.op}")


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix) :] if name.startswith(prefix) else name


def fill_model(
    module: nn.Module,
    family: Family,
    weights: CheckpointWeights,
    dtype: torch.dtype,
    source: str,
) -> None:
    """Give every parameter of a ``meta``-device Transformer its weights from ``weights``."""
    cfg = module.config
    rules = family.rules(cfg)
    have = weights.names()
    if family.prefix and not any(n.startswith(family.prefix) for n in have):
        # the body saved without its wrapper (the original GPT-2 upload: "h.0.attn...", "wte.weight")
        rules = [dataclasses.replace(r, hf=tuple(_strip(h, family.prefix) for h in r.hf)) for r in rules]
    needed = {h for r in rules for h in r.hf}
    missing = sorted(needed - have)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise LmlabError(
            f"{source} lacks tensors its config.json implies: {', '.join(missing[:5])}{more}; "
            "the weights are incomplete or belong to another configuration"
        )
    extra = sorted(
        n
        for n in have - needed
        if not n.endswith(family.ignore) and not (cfg.tie_embeddings and n == family.head)
    )
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise LmlabError(
            f"{source} has tensors a {family.model_type} model of its config.json does not use: "
            f"{', '.join(extra[:5])}{more}; lmlab would ignore part of the model, so it refuses"
        )
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    state = {}
    for rule in rules:
        dst = torch.empty(shapes[rule.lm], dtype=dtype)
        _fill(dst, rule, [weights.get(h) for h in rule.hf], cfg.n_head, cfg.head_dim, weights.mapped)
        state[rule.lm] = dst
    module.load_state_dict(state, strict=False, assign=True)
    module.tie_weights()  # lm_head still points at the meta tensor when tied
    left = [n for n, p in module.named_parameters() if p.is_meta]
    if left:  # pragma: no cover - a family's rules miss a parameter
        raise AssertionError(f"no rule filled {left}")


# --------------------------------------------------------------------------- writing
def export_tensors(module: nn.Module, family: Family, cfg, dtype: torch.dtype) -> dict[str, Tensor]:
    """The Hugging Face state dict of ``module`` laid out as ``family`` (``cfg``: its
    export config), in ``dtype``. Tensors lmlab lacks (biases a family always has) are
    written as zeros."""
    sd = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    pos = getattr(module, "pos_emb", None)
    if pos is not None and "pos_emb.weight" not in sd:  # sinusoidal: the table becomes wpe
        sd["pos_emb.weight"] = pos.table[: cfg.max_seq_len].cpu()
    out: dict[str, Tensor] = {}
    for rule in family.rules(cfg):
        t = sd.get(rule.lm)
        if t is None:
            if not rule.lm.endswith(".bias"):  # pragma: no cover - a family's rules are wrong
                raise AssertionError(f"no tensor {rule.lm}")
            weight = sd[rule.lm[: -len("bias")] + "weight"]
            t = torch.zeros(weight.shape[0], dtype=weight.dtype)
        out.update(_unfold(rule, t, cfg.n_head, cfg.head_dim))
    # each tensor gets its own storage: safetensors refuses tensors that share memory
    return {k: v.to(dtype).contiguous().clone() for k, v in out.items()}


def _unfold(rule: Rule, t: Tensor, n_head: int, head_dim: int) -> Iterable[tuple[str, Tensor]]:
    """The inverse of :func:`_fill`: one lmlab tensor -> its Hugging Face parts."""
    if rule.op == "copy":
        return [(rule.hf[0], t)]
    if rule.op == "t":
        return [(rule.hf[0], t.T)]
    if rule.op == "cat":
        return list(zip(rule.hf, t.split(list(rule.sizes)), strict=True))
    if rule.op == "heads":
        rest = tuple(t.shape[1:])
        return [(rule.hf[0], t.view(3, n_head, head_dim, *rest).transpose(0, 1).reshape(t.shape))]
    if rule.op == "plus1":
        return [(rule.hf[0], (t.float() - 1.0).to(t.dtype))]
    raise AssertionError(f"unknown op {rule.op}")  # pragma: no cover
