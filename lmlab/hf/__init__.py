"""Hugging Face interop: run ``transformers`` checkpoints on lmlab's Transformer, and back.

    load_hf("gpt2" | "./Qwen2.5-0.5B")  ->  ModelParts (lmlab.load wraps them)   (import)
    export_hf(model or source, "out/")  ->  a folder AutoModelForCausalLM loads  (export)

Supported ``model_type``: gpt2, llama, mistral, qwen2, gemma, gpt_neox. Each is a
setting of the one :class:`~lmlab.models.transformer.Transformer` (see
:mod:`lmlab.hf.families`); anything the Transformer cannot compute with parity is
refused with the name of the setting, never silently ignored. ``transformers`` itself
is not needed: lmlab reads and writes the files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from lmlab.checkpoint import read_json, save_safetensors
from lmlab.errors import LmlabError
from lmlab.generate.config import GREEDY_BELOW
from lmlab.hf.families import FAMILIES, choose_family, family_for, same_architecture
from lmlab.hf.weights import CheckpointWeights, export_tensors, fill_model
from lmlab.models.config import Seq2SeqConfig, TransformerConfig
from lmlab.models.loading import ModelParts, is_lmlab_checkpoint, load_checkpoint, reinit_buffers
from lmlab.runtime import resolve_device, resolve_dtype

__all__ = ["FAMILIES", "export_hf", "load_hf", "resolve_source"]

# what a Hub download fetches (never the TF/Flax/ONNX copies many repositories also hold)
_HUB_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",  # lmlab serve renders a model's own chat template
    "additional_chat_templates/*.jinja",
    "vocab.json",
    "merges.txt",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
]
_HUB_PICKLE = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]
# generation_config.json on export: every setting in transformers' names, as it is, except
# lmlab's options transformers has no field for: ``stop`` is transformers' ``stop_strings``;
# the rest are kept under LMLAB_GENERATION_KEY (transformers keeps an unknown key as an
# attribute and does nothing with it; lmlab reads them back on import)
LMLAB_GENERATION_KEY = "lmlab_generation"
_LMLAB_ONLY = ("presence_penalty", "frequency_penalty", "bad_words", "logprobs", "seed")
_RENAMED = {"stop": "stop_strings"}


# --------------------------------------------------------------------------- sources
def _offline() -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _not_available(repo: str, why: str, offline: bool) -> LmlabError:
    """The way on is the same download; the last hint names HF_HUB_OFFLINE only when it is
    what stopped the download (it is set), never a variable the user does not have."""
    name = repo.split("/")[-1]
    files = "config.json generation_config.json 'model*.safetensors*' 'tokenizer*' vocab.json merges.txt"
    if offline and os.environ.get("HF_HUB_OFFLINE"):
        last = "or, with network access, unset HF_HUB_OFFLINE and lmlab downloads it into the Hugging Face cache"
    else:
        last = "or run the command again once the Hub can be reached: lmlab downloads it into the Hugging Face cache"
    return LmlabError(
        f"{repo!r} is not a local folder and cannot be downloaded ({why}). On a machine with "
        f"network access run `hf download {repo} --include {files} --local-dir {name}`, copy the "
        f"folder {name}/ here and pass its path (e.g. `lmlab generate ./{name}`); {last}"
    )


def resolve_source(source: str, allow_pickle: bool = False) -> Path:
    """A local Hugging Face folder as it is; a Hub id downloaded (or found in the cache)."""
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:  # pragma: no cover
        raise LmlabError(
            f"{source} is not a folder, and huggingface_hub is not installed to download it"
        ) from None
    offline = _offline()
    try:
        path = Path(snapshot_download(source, allow_patterns=_HUB_FILES, local_files_only=offline))
        if not any(path.glob("model*.safetensors")) and allow_pickle:
            path = Path(snapshot_download(source, allow_patterns=_HUB_PICKLE, local_files_only=offline))
    except GatedRepoError:
        raise LmlabError(
            f"{source} is gated on the Hugging Face Hub: accept its licence on huggingface.co, "
            "then log in with `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise LmlabError(
            f"{source} is neither a local folder nor a model on the Hugging Face Hub "
            "(check the spelling; a private model needs `hf auth login`)"
        ) from None
    except RevisionNotFoundError as e:  # pragma: no cover - we never pass a revision
        raise LmlabError(f"{source}: {e}") from None
    except Exception as e:  # offline, no network, a cache miss: all say "cannot get it"
        why = str(e).splitlines()[0]
        if offline:
            mode = f"HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']}" if os.environ.get("HF_HUB_OFFLINE") else ""
            why = f"offline mode{f' ({mode})' if mode else ''}, and it is not in the cache"
        raise _not_available(source, why, offline) from None
    if not (path / "config.json").is_file():
        raise LmlabError(
            f"{source} on the Hugging Face Hub has no config.json: it is not a transformers model"
        )
    return path


def _generation_config(folder: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """Token ids from config.json, then everything generation_config.json says (it wins,
    as in transformers). Keys lmlab does not use are kept for export."""
    gen = {k: raw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if raw.get(k) is not None}
    f = folder / "generation_config.json"
    if f.is_file():
        extra = read_json(f, "generation config")
        gen.update({k: v for k, v in extra.items() if not k.startswith("_") and k != "transformers_version"})
        own = gen.pop(LMLAB_GENERATION_KEY, None)  # lmlab-only options an lmlab export kept aside
        if isinstance(own, dict):
            gen.update({k: v for k, v in own.items() if k in (*_LMLAB_ONLY, "max_new_tokens")})
    return gen


def _refuse_quantized(raw: dict[str, Any], source: str) -> None:
    """A pre-quantized checkpoint (GPTQ, AWQ, bitsandbytes, fp8...) stores packed integers and
    scales, not the float weights lmlab's layers take."""
    q = raw.get("quantization_config")
    if q:
        method = q.get("quant_method", "?") if isinstance(q, dict) else q
        raise LmlabError(
            f"{source} is a quantized checkpoint (quantization_config: quant_method={method}); lmlab reads "
            "float weights only: use the unquantized model (lmlab can quantize it when loading: --quantize int8)"
        )


def _read_optional_json(path: Path) -> dict[str, Any] | None:
    return read_json(path, "tokenizer config") if path.is_file() else None


# --------------------------------------------------------------------------- import
def stored_dtype(raw: dict[str, Any]) -> torch.dtype:
    """The dtype a model loads in when none is asked for: bf16 for a checkpoint stored in bf16
    (as transformers 5 loads it: no fp32 copy, half the memory, and the numbers it was trained
    with), else float32 — an fp16 checkpoint too, since CPU fp16 products are slow and overflow
    easily (``--dtype fp16`` asks for it)."""
    stored = raw.get("dtype") or raw.get("torch_dtype")
    return torch.bfloat16 if stored in ("bfloat16", "bf16") else torch.float32


def load_hf(
    source: str,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
    exact_bf16_only: bool = False,
) -> ModelParts:
    """A Hugging Face model (folder or Hub id) as :class:`~lmlab.models.loading.ModelParts`
    (which :func:`lmlab.load` wraps as an :class:`lmlab.Model`).

    ``exact_bf16_only`` (with no ``dtype``): the stored bf16 only where every number loads
    exactly in it — every tensor of the files is bf16 (whatever config.json says) and no
    family rule computes a new value (Gemma's 1 + w) — else float32. What an int8 load uses:
    its float parts are converted to fp32 after quantizing, and must be the fp32 load's.

    The Transformer is built on the ``meta`` device and its tensors are filled straight
    from the memory-mapped safetensors in ``dtype`` (default: :func:`stored_dtype`), so loading
    needs about the weights' size in memory, once.
    """
    from lmlab.hf.encoder import ENCODER_FAMILIES, load_encoder_tokenizer
    from lmlab.hf.seq2seq import SEQ2SEQ_FAMILIES
    from lmlab.models.heads import TaskModel
    from lmlab.models.seq2seq import Seq2SeqTransformer
    from lmlab.models.transformer import Transformer
    from lmlab.tokenizer import load_tokenizer

    folder = resolve_source(source, allow_pickle)
    if not (folder / "config.json").is_file():
        raise LmlabError(f"{folder} has no config.json; a Hugging Face model folder needs one")
    raw = read_json(folder / "config.json", "config")
    seq2seq = SEQ2SEQ_FAMILIES.get(str(raw.get("model_type")))
    encoder = ENCODER_FAMILIES.get(str(raw.get("model_type")))
    family = seq2seq or encoder or family_for(raw, source)
    _refuse_quantized(raw, source)
    try:
        cfg = family.to_lmlab(raw)
    except LmlabError as e:  # the file's fault, not a flag's: name the file
        raise LmlabError(f"{folder}/config.json does not describe a valid {family.model_type} model: {e}") from None
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:
        raise LmlabError(f"{folder}/config.json has a field of the wrong type or value ({e}); fix or re-download it") from None
    dt = resolve_dtype(dtype) or stored_dtype(raw)
    target_tok = None
    if seq2seq and not (folder / "tokenizer.json").is_file():
        from lmlab.spm import load_seq2seq_tokenizers  # SentencePiece files (Marian, T5)

        tok, target_tok = load_seq2seq_tokenizers(folder)
        target_tok = None if target_tok is tok else target_tok
    elif encoder:
        tok = load_encoder_tokenizer(folder, encoder)
    else:
        tok = load_tokenizer(folder)  # before the weights: a missing tokenizer fails fast
    weights = CheckpointWeights(folder, allow_pickle)
    if exact_bf16_only and dtype is None and dt == torch.bfloat16:
        if not weights.all_bf16() or any(r.computes for r in family.rules(cfg)):
            dt = torch.float32
    try:
        if seq2seq:
            seq2seq.untie_if_stored(cfg, weights)
        with torch.device("meta"):
            module = Seq2SeqTransformer(cfg) if seq2seq else TaskModel(cfg) if encoder else Transformer(cfg)
        fill_model(module, family, weights, dt, source)
    finally:
        weights.close()
    reinit_buffers(module)  # RoPE tables are not weights: compute them
    module.hf_origin = {  # what export needs to write this family back as it was (and `lmlab info` shows)
        "model_type": family.model_type,
        "path": str(folder.resolve()),
        "config": raw,
        "tokenizer_config": _read_optional_json(folder / "tokenizer_config.json"),
        "special_tokens_map": _read_optional_json(folder / "special_tokens_map.json"),
    }
    if device is not None:
        module = module.to(resolve_device(device))
    gen = _generation_config(folder, raw)
    if seq2seq:  # config.json's generation keys first; generation_config.json wins
        gen = {**seq2seq.generation_defaults(raw), **gen}
    return ModelParts(module, tok, gen, source=str(source), target_tokenizer=target_tok)


def load_any(
    source: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
    exact_bf16_only: bool = False,
) -> ModelParts:
    """Any model source as :class:`ModelParts`: an lmlab checkpoint folder, a Hugging Face
    folder (config.json without lmlab's marker) or a Hub id like ``gpt2``."""
    if not is_lmlab_checkpoint(Path(source)) and _looks_foreign(source):
        return load_hf(str(source), dtype=dtype, device=device, allow_pickle=allow_pickle, exact_bf16_only=exact_bf16_only)
    return load_checkpoint(source, dtype=dtype, device=device)


def _looks_foreign(path: str | Path) -> bool:
    """A Hugging Face folder (config.json without lmlab's marker) or a Hub id like 'gpt2'."""
    p = Path(path)
    if p.is_dir():
        return (p / "config.json").is_file()
    if not p.exists() and str(p.parent) not in ("", ".") and p.parent.is_dir():
        return False  # 'runs/typo': a local folder that is missing, not a Hub id
    return not p.exists() and not str(path).startswith((".", "/", "~")) and str(path).count("/") <= 1


# --------------------------------------------------------------------------- export
def _hf_generation_config(gen: dict[str, Any]) -> dict[str, Any]:
    """lmlab's generation settings as transformers' GenerationConfig reads them.

    Everything is carried through as it is (an imported model's own settings round-trip),
    except: ``stop`` becomes ``stop_strings``; options transformers has no field for
    (presence/frequency penalties, bad_words as strings, logprobs, seed, max_new_tokens=0,
    which its validation refuses) go under ``LMLAB_GENERATION_KEY``; temperature 0 (lmlab's
    greedy) becomes ``do_sample=false``; a temperature > 0, or several return sequences
    without beams, and no ``do_sample`` becomes ``do_sample=true`` (lmlab samples then);
    no ``pad_token_id`` becomes the (first) EOS id, as transformers' generate assumes.
    """
    out = {k: v for k, v in gen.items() if v is not None and not k.startswith("_")}
    out.pop("transformers_version", None)
    extra = dict(out.pop(LMLAB_GENERATION_KEY, None) or {})
    extra.update({k: out.pop(k) for k in _LMLAB_ONLY if k in out})
    if out.get("max_new_tokens") == 0:  # lmlab: generate nothing; transformers refuses 0
        extra["max_new_tokens"] = out.pop("max_new_tokens")
    for mine, theirs in _RENAMED.items():
        if mine in out:
            out[theirs] = out.pop(mine)  # ours wins, as GenerationConfig.from_dict reads them
    t = out.get("temperature")
    if t is not None and t < GREEDY_BELOW:  # lmlab decodes these greedily
        del out["temperature"]
        out["do_sample"] = False
    elif t is not None and "do_sample" not in out:
        out["do_sample"] = True
    n = out.get("num_return_sequences")
    if isinstance(n, int) and n > 1 and out.get("num_beams", 1) <= 1 and "do_sample" not in out:
        out["do_sample"] = True  # lmlab samples by default; transformers refuses n greedy copies
    eos = out.get("eos_token_id")
    first_eos = eos[0] if isinstance(eos, list) and eos else eos
    if "pad_token_id" not in out and isinstance(first_eos, int):
        out["pad_token_id"] = first_eos
    if extra:
        out[LMLAB_GENERATION_KEY] = extra
    return out


def _tokenizer_config(model: Any, origin: dict[str, Any] | None, max_len: int) -> dict[str, Any]:
    """The original tokenizer_config.json, or a minimal one that makes AutoTokenizer read
    tokenizer.json as it is (so encoding matches lmlab's, special tokens included)."""
    if origin and origin.get("tokenizer_config"):
        return origin["tokenizer_config"]
    tok = model.tokenizer
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        i = model.generation_config.get(key)
        if isinstance(i, list):
            i = i[0] if i else None
        if isinstance(i, int) and tok.id_to_token(i) is not None:
            cfg[key[: -len("_id")]] = tok.id_to_token(i)
    cfg["clean_up_tokenization_spaces"] = False
    return cfg


def export_hf(
    model_or_source: Any,
    out_dir: str | Path,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
) -> Path:
    """Write ``model_or_source`` (an lmlab.Model, an lmlab checkpoint, or anything
    :func:`load_hf` reads) as a Hugging Face folder: config.json, model.safetensors,
    tokenizer.json + tokenizer_config.json, generation_config.json.

    An imported model goes back to its own family; an lmlab-trained one to the family
    that computes exactly the same function (GPT-2, Llama, GPT-NeoX, Gemma), or an
    LmlabError names the setting no family has.
    """
    model = model_or_source
    if isinstance(model, (str, Path)):
        model = load_any(str(model_or_source), dtype=dtype, allow_pickle=allow_pickle)
    module = model.module
    if module.quantization:
        raise LmlabError(
            f"this model is {module.quantization}-quantized: its rounded weights are not the checkpoint's; "
            "export the unquantized checkpoint (load it without quantize=..., or pass its path: "
            "`lmlab export PATH --out OUT`)"
        )
    cfg = module.config
    if cfg.model_type == "task":
        raise LmlabError(
            "classifiers, QA readers and masked-LM encoders trained here do not export to Hugging Face yet: "
            "export language models and encoder-decoders (lmlab loads and serves the task models as they are)"
        )
    if not isinstance(cfg, (TransformerConfig, Seq2SeqConfig)):
        raise LmlabError(
            f"only Transformers export to Hugging Face; this is a {cfg.model_type} model "
            "(transformers has no matching recurrent architecture)"
        )
    origin = module.hf_origin
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmlabError(f"{out} already exists and is not empty; choose a new --out folder or remove it")
    want = resolve_dtype(dtype) or module.dtype
    if isinstance(cfg, Seq2SeqConfig):
        from lmlab.hf.seq2seq import seq2seq_export

        family, hf_cfg, tensors = seq2seq_export(module, cfg, origin, want)
    else:
        family = choose_family(cfg, origin["model_type"] if origin else None)
        ecfg = family.export_config(cfg)
        hf_cfg = family.to_hf(ecfg)
        if origin and origin["model_type"] == family.model_type:
            base = dict(origin["config"])
            if not same_architecture(family.to_lmlab(base), cfg):
                base.update(hf_cfg)  # the model was changed since import: its settings win
            hf_cfg = base
        tensors = export_tensors(module, family, ecfg, want)
    gen = _hf_generation_config(model.generation_config)
    # config.json: the model's own ids only (a pad id there marks an embedding row as padding)
    own = model.generation_config
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    if isinstance(cfg, Seq2SeqConfig):
        keys += ("decoder_start_token_id", "forced_eos_token_id")
    ids = {k: gen[k] for k in keys if own.get(k) is not None}
    hf_cfg = {
        **ids,  # an lmlab model's token ids; an imported config keeps its own
        **hf_cfg,
        "model_type": family.model_type,
        "architectures": [family.architecture],
        "dtype": str(want).removeprefix("torch."),
    }
    hf_cfg.pop("torch_dtype", None)
    # Written into a fresh sibling folder, then renamed into place in one step: a reader
    # never sees half an export, and of two exports racing to one --out exactly one wins
    # (renaming onto a folder that is no longer empty fails).
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LmlabError(f"cannot create --out {out} ({e.strerror}); choose another folder") from None
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir()
        _write_hf_folder(work, model, tensors, hf_cfg, gen, origin, cfg.max_seq_len)
        try:
            os.rename(work, out)
        except OSError as e:
            raise LmlabError(f"{out} was filled by another process while exporting ({e.strerror}); "
                             "choose a new --out folder") from None
    except (OSError, SafetensorError) as e:
        raise LmlabError(f"cannot write the export to {out} ({getattr(e, 'strerror', None) or e}); "
                         "check the folder's permissions and free space") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _write_hf_folder(
    out: Path, model: Any, tensors: dict[str, torch.Tensor], hf_cfg: dict[str, Any], gen: dict[str, Any],
    origin: dict[str, Any] | None, max_len: int,
) -> None:
    save_safetensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n", encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    model.tokenizer.save(str(out / "tokenizer.json"))
    tcfg = _tokenizer_config(model, origin, max_len)
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n", encoding="utf-8")
    if origin and origin.get("special_tokens_map"):
        stm = json.dumps(origin["special_tokens_map"], indent=2)
        (out / "special_tokens_map.json").write_text(stm + "\n", encoding="utf-8")
    src = Path(str(model.source))
    for extra in ("chat_template.jinja",):  # carried along when the source folder has it
        if src.is_dir() and (src / extra).is_file():
            shutil.copy(src / extra, out / extra)
