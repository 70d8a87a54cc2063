"""Hugging Face interop, checked against ``transformers`` itself on the same weights.

Every model here is a tiny random Hugging Face model built in ``tmp_path`` (config +
``save_pretrained``) with a byte-level BPE tokenizer trained on a few KB: no downloads.
The reference is always transformers' own forward pass / ``generate`` / tokenizer.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import run_lmlab
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import lmlab
from lmlab.api import Model
from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.generate import GenerationConfig as LmlabGenerationConfig
from lmlab.hf import export_hf
from lmlab.models.config import TransformerConfig
from lmlab.models.transformer import Transformer
from lmlab.tokenizer import train_char_tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

TEXT = (
    "First Citizen: Before we proceed any further, hear me speak.\n"
    "All: Speak, speak. You are all resolved rather to die than to famish?\n"
    "Resolved, resolved. We know it, we know it. Let us kill him, and we'll have corn at our own price.\n"
) * 30
PROMPT = "First Citizen: we know"
SPECIALS = ["<|endoftext|>", "<s>", "</s>"]  # ids 0, 1, 2

# name -> (config class, settings, BOS added by the tokenizer's post-processor, config.json in the older form)
# Together they cover: GQA (6/2) and MQA (4/1, 4/1), tied and untied embeddings, head counts
# 3 and 6 (not powers of two), RoPE bases 5e5, 1e6 and 2e4, head_dim ≠ d_model/n_head
# (Gemma), partial rotary + parallel residual (GPT-NeoX), and q/k/v biases (Qwen2).
CASES = {
    "gpt2": ("GPT2Config", dict(n_embd=48, n_layer=2, n_head=3, n_positions=96), False, False),
    "llama": (
        "LlamaConfig",
        dict(num_attention_heads=6, num_key_value_heads=2, rope_theta=5e5, tie_word_embeddings=False),
        True,
        True,
    ),
    "mistral": (
        "MistralConfig",
        dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=None, tie_word_embeddings=True),
        True,
        False,
    ),
    "qwen2": (
        "Qwen2Config",
        dict(num_attention_heads=6, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True),
        False,
        False,
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(num_attention_heads=3, rotary_pct=0.5, rotary_emb_base=20000.0, tie_word_embeddings=False),
        False,
        True,
    ),
    "gemma": ("GemmaConfig", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16), True, False),
}
COMMON = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=96)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    return tok


def _old_form(cfg: dict) -> dict:
    """config.json as transformers 4.x wrote it: top-level rope_theta / rotary_pct."""
    rp = cfg.pop("rope_parameters")
    if cfg["model_type"] == "gpt_neox":
        cfg["rotary_pct"] = rp["partial_rotary_factor"]
        cfg["rotary_emb_base"] = rp["rope_theta"]
    else:
        cfg["rope_theta"] = rp["rope_theta"]
    return cfg


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Perturb every tensor so biases and norm weights are not their trivial init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, tokenizer):
    """name -> (folder, transformers model): built once per module."""
    cache: dict[str, tuple[Path, torch.nn.Module]] = {}

    def build(name: str) -> tuple[Path, torch.nn.Module]:
        if name in cache:
            return cache[name]
        cls, settings, bos, old = CASES[name]
        tok = Tokenizer.from_str(tokenizer.to_str())
        ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2} if bos else {}
        if bos:
            tok.post_processor = processors.TemplateProcessing(
                single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
            )
        else:
            ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
        kw = dict(settings) if name == "gpt2" else {**COMMON, **settings}
        cfg = getattr(transformers, cls)(vocab_size=tok.get_vocab_size(), initializer_range=0.1, **ids, **kw)
        torch.manual_seed(len(name))
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        _randomize(model, len(name))
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        tok.save(str(folder / "tokenizer.json"))
        tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": SPECIALS[ids["eos_token_id"]]}
        (folder / "tokenizer_config.json").write_text(json.dumps(tcfg))
        if old:
            raw = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps(_old_form(raw)))
            model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()  # reads the old form
        cache[name] = folder, model
        return cache[name]

    return build


def _hf_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# --------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers_with_and_without_cache(name, hf_model):
    folder, ref_model = hf_model(name)
    model = lmlab.load(folder)
    assert model.module.hf_origin["model_type"] == name
    ids = torch.randint(0, ref_model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    ref = _hf_logits(ref_model, ids)
    torch.testing.assert_close(model.logits(ids), ref, atol=1e-4, rtol=0)

    # the same sequence fed through lmlab's KV cache: a prompt chunk, single tokens, a chunk
    module, parts = model.module, []
    state = module.init_state(3, 40)
    with torch.no_grad():
        for a, b in [(0, 11), (11, 12), (12, 13), (13, 14), (14, 40)]:
            logits, state = module(ids[:, a:b], state)
            parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_greedy_generation_and_cli_match_transformers(name, hf_model, capsys):
    folder, ref_model = hf_model(name)
    ref_tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompt_ids = ref_tok.encode(PROMPT).ids
    model = lmlab.load(folder)
    assert model.encode(PROMPT) == prompt_ids  # the post-processor decides BOS
    assert (prompt_ids[0] == 1) == CASES[name][2]

    x = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = ref_model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=32,
            do_sample=False,
            pad_token_id=ref_model.config.eos_token_id,
        )
    new_ids = out[0, len(prompt_ids) :].tolist()
    assert model.generate_ids(PROMPT, temperature=0, max_new_tokens=32) == new_ids

    args = ["generate", str(folder), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "32"]
    assert main(args) == 0
    assert capsys.readouterr().out == ref_tok.decode(new_ids, skip_special_tokens=True) + "\n"


def test_python_m_lmlab_generate_matches_decode(hf_model):
    folder, ref_model = hf_model("gpt2")
    ref_tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    x = torch.tensor([ref_tok.encode(PROMPT).ids])
    with torch.no_grad():
        out = ref_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False)
    want = ref_tok.decode(out[0, x.shape[1] :].tolist(), skip_special_tokens=True)
    args = ["generate", str(folder), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "32"]
    r = run_lmlab(*args, timeout=120)
    assert r.stdout == want + "\n"


# --------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", CASES)
def test_export_round_trip(name, hf_model, tmp_path):
    folder, ref_model = hf_model(name)
    model = lmlab.load(folder)
    out = export_hf(model, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["model_type"] == name  # its own family

    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, ref_model.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    mine = model.logits(ids)
    torch.testing.assert_close(_hf_logits(back, ids), mine, atol=1e-4, rtol=0)
    torch.testing.assert_close(lmlab.load(out).logits(ids), mine, atol=1e-6, rtol=0)

    auto_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert auto_tok(PROMPT).input_ids == model.encode(PROMPT)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ref_model.config.eos_token_id


def _lmlab_model(cfg: TransformerConfig, seed: int = 0) -> Model:
    tok = train_char_tokenizer([TEXT])
    torch.manual_seed(seed)
    module = Transformer(TransformerConfig(**{**cfg.__dict__, "vocab_size": tok.get_vocab_size()}))
    _randomize(module, seed)
    return Model(module, tok, {"eos_token_id": 0, "bos_token_id": 0}, source="test")


TRAINED = {  # lmlab-trained architectures and the Hugging Face family that computes exactly the same
    "gpt2": dict(pos="learned", norm="layernorm", norm_bias=True, activation="gelu", gated_mlp=False,
                 qkv_bias=True, proj_bias=True, mlp_bias=True, n_head=3, d_model=48),
    "gpt2-sinusoidal-nobias-untied": dict(pos="sinusoidal", norm="layernorm", activation="gelu_tanh",
                                          gated_mlp=False, tie_embeddings=False, n_head=4, d_model=32),
    "llama": dict(pos="rope", norm="rmsnorm", activation="silu", gated_mlp=True, n_head=6, n_kv_head=2,
                  d_model=48, tie_embeddings=False, rope_theta=30000.0),
    "gpt_neox": dict(pos="rope", norm="layernorm", norm_bias=True, activation="gelu", gated_mlp=False,
                     parallel_residual=True, rotary_dim=4, n_head=4, d_model=32),
}  # fmt: skip


@pytest.mark.parametrize("kind", TRAINED)
def test_export_lmlab_trained_model(kind, tmp_path):
    model = _lmlab_model(TransformerConfig(n_layer=2, max_seq_len=64, **TRAINED[kind]))
    out = export_hf(model, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == kind.split("-")[0]
    ids = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    mine = model.logits(ids)
    torch.testing.assert_close(_hf_logits(back, ids), mine, atol=1e-4, rtol=0)
    torch.testing.assert_close(lmlab.load(out).logits(ids), mine, atol=1e-6, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(out)("We know").input_ids == model.encode("We know")


def test_cli_export_from_lmlab_checkpoint(tmp_path, capsys):
    model = _lmlab_model(TransformerConfig(n_layer=1, max_seq_len=32, **TRAINED["llama"]))
    ckpt = model.save(tmp_path / "ckpt")
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "llama" in capsys.readouterr().err
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([model.encode("We know it, let us")])
    torch.testing.assert_close(_hf_logits(back, ids), model.logits(ids), atol=1e-4, rtol=0)
    # a second export into the now non-empty folder is refused, not merged
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hf")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    half = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (dict(pos="rope", norm="rmsnorm", gated_mlp=False, activation="gelu"), "--mlp gelu"),
        (dict(pos="learned", norm="rmsnorm", gated_mlp=False, activation="gelu"), "--norm rmsnorm"),
        (dict(pos="learned", norm="layernorm", gated_mlp=False, n_kv_head=2), "--n-kv-head 2"),
    ],
)
def test_export_refuses_architectures_without_an_equivalent(settings, named, tmp_path):
    model = _lmlab_model(TransformerConfig(n_layer=1, n_head=4, d_model=32, max_seq_len=32, **settings))
    with pytest.raises(LmlabError, match="no exact Hugging Face equivalent") as e:
        export_hf(model, tmp_path / "hf")
    assert named in str(e.value)
    assert not (tmp_path / "hf").exists()


# --------------------------------------------------------------------------- loading paths
def test_sharded_checkpoint_and_bf16(hf_model, tmp_path):
    _, ref_model = hf_model("llama")
    folder = tmp_path / "sharded"
    ref_model.save_pretrained(folder, max_shard_size="40KB")
    shutil.copy(hf_model("llama")[0] / "tokenizer.json", folder)
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    ids = torch.randint(0, ref_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    ref = _hf_logits(ref_model, ids)
    torch.testing.assert_close(lmlab.load(folder).logits(ids), ref, atol=1e-4, rtol=0)

    half = lmlab.load(folder, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in half.module.parameters())
    err = (half.logits(ids).float() - ref).abs().max()
    assert err < 0.05 * ref.abs().max()  # bf16 keeps ~3 significant digits


def test_pickle_bin_is_refused_unless_allowed(hf_model, tmp_path, capsys):
    src, ref_model = hf_model("qwen2")
    folder = tmp_path / "pickled"
    shutil.copytree(src, folder)
    (folder / "model.safetensors").unlink()
    torch.save(ref_model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(LmlabError, match="--allow-pickle"):
        lmlab.load(folder)
    assert main(["generate", str(folder), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    assert "lmlab: error:" in capsys.readouterr().err
    ids = torch.randint(0, ref_model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(4))
    got = lmlab.load(folder, allow_pickle=True).logits(ids)
    torch.testing.assert_close(got, _hf_logits(ref_model, ids), atol=1e-4, rtol=0)


def _with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    raw.update(changes)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.parametrize(
    ("name", "changes", "named"),
    [
        ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "llama3"),
        ("llama", dict(rope_scaling={"type": "linear", "factor": 2.0}), "'linear'"),
        ("mistral", dict(sliding_window=16), "sliding_window=16"),
        ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=0), "sliding_window=16"),
        (
            "gpt2",
            dict(model_type="bloom"),
            "supported model_type: gpt2, llama, mistral, qwen2, gemma, gpt_neox",
        ),
    ],
)
def test_unsupported_features_are_refused(name, changes, named, hf_model, tmp_path):
    folder = _with_config(hf_model(name)[0], tmp_path / "m", **changes)
    with pytest.raises(LmlabError) as e:
        lmlab.load(folder)
    assert named in str(e.value)


def test_unknown_tensor_is_refused_not_ignored(hf_model, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "extra"
    shutil.copytree(hf_model("mistral")[0], folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(12)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LmlabError, match="q_norm"):
        lmlab.load(folder)


def test_hub_id_offline_says_what_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LmlabError, match="hf download lmlab-tests/no-such-model") as e:
        lmlab.load("lmlab-tests/no-such-model")
    assert "HF_HUB_OFFLINE" in str(e.value)


def test_gpt2_saved_without_its_wrapper_prefix(hf_model, tmp_path):
    """The original GPT-2 upload names tensors "h.0.attn.c_attn.weight", "wte.weight" (no
    "transformer." and no lm_head) and still carries the old causal-mask buffers."""
    from safetensors.torch import load_file, save_file

    src, ref_model = hf_model("gpt2")
    folder = tmp_path / "gpt2-bare"
    shutil.copytree(src, folder)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(folder / "model.safetensors").items()}
    tensors.pop("lm_head.weight", None)
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 96, 96).tril()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    ids = torch.randint(0, ref_model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(lmlab.load(folder).logits(ids), _hf_logits(ref_model, ids), atol=1e-4, rtol=0)


def test_hub_id_downloads_only_what_lmlab_reads(hf_model, monkeypatch):
    """A Hub id goes through huggingface_hub.snapshot_download (here: answered from a local
    folder, as the cache would be), fetching config, safetensors and tokenizer files only."""
    import huggingface_hub

    folder, ref_model = hf_model("qwen2")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, local_files_only=False, **kw):
        calls.append((repo_id, allow_patterns, local_files_only))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = lmlab.load("someone/tiny-qwen2")
    (repo, patterns, offline), *_ = calls
    assert repo == "someone/tiny-qwen2" and offline  # HF_HUB_OFFLINE=1: the cache only
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(patterns)
    assert not any(p.endswith((".bin", ".h5", ".msgpack", ".onnx")) for p in patterns)
    ids = torch.randint(0, ref_model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(model.logits(ids), _hf_logits(ref_model, ids), atol=1e-4, rtol=0)


def test_hub_id_without_network_says_what_to_download(monkeypatch, capsys):
    import huggingface_hub

    def no_network(*a, **kw):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.setattr("lmlab.hf._offline", lambda: False)
    assert main(["generate", "someone/model", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("lmlab: error:") and "Failed to resolve" in err and "hf download someone/model" in err
    )


def test_imported_model_saved_by_lmlab_exports_to_its_family(hf_model, tmp_path):
    """Saved as an lmlab checkpoint the model forgets where it came from; export still picks
    the family that holds it exactly (q/k/v biases only: Qwen2, not Llama with zero biases)."""
    folder, ref_model = hf_model("qwen2")
    ckpt = lmlab.load(folder).save(tmp_path / "ckpt")
    out = export_hf(str(ckpt), tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    ids = torch.randint(0, ref_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_hf_logits(back, ids), _hf_logits(ref_model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_fine_tune_with_init_lowers_the_loss_and_resumes(name, hf_model, tmp_path):
    """`lmlab train --init HF_DIR`: the imported model and its tokenizer, the usual Trainer."""
    from lmlab.eval.perplexity import evaluate_corpus

    folder, _ = hf_model(name)
    data = tmp_path / "fine_tune.txt"
    data.write_text(TEXT * 4, encoding="utf-8")
    before = evaluate_corpus(lmlab.load(folder), data)["loss"]
    out = tmp_path / "ft"
    opts = dict(
        data=str(data),
        out=str(out),
        batch_size=4,
        max_seq_len=32,
        lr=3e-3,
        warmup=5,
        eval_every=10,
        save_every=10,
        progress=False,
    )
    lmlab.train(init=str(folder), steps=30, **opts)
    after = evaluate_corpus(lmlab.load(out), data)["loss"]
    assert after < before - 0.5, (before, after)
    # The checkpoint keeps the imported tokenizer and resumes like any other.
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads(
        (folder / "tokenizer.json").read_text()
    )
    res = lmlab.train(resume=str(out), steps=40, progress=False)
    assert res.step == 40


# --------------------------------------------------------------------------- eval/info/export: issue #4
def _pickled_folder(name: str, hf_model, dst: Path) -> tuple[Path, torch.nn.Module]:
    """The model ``name`` as a folder whose only weights are ``pytorch_model.bin``: what
    ``save_pretrained(..., safe_serialization=False)`` writes (transformers 5 ignores that
    argument and writes safetensors, so the state dict is then pickled as 4.x did)."""
    src, ref_model = hf_model(name)
    ref_model.save_pretrained(dst, safe_serialization=False)
    if not (dst / "pytorch_model.bin").is_file():
        torch.save(ref_model.state_dict(), dst / "pytorch_model.bin")
    for f in dst.glob("model*.safetensors*"):
        f.unlink()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, dst / f)
    assert not any(dst.glob("*.safetensors")) and (dst / "pytorch_model.bin").is_file()
    return dst, ref_model


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmlab: error: "), err
    return err[0]


def test_eval_and_info_read_pickle_only_with_allow_pickle(hf_model, tmp_path, capsys):
    """`lmlab eval` / `lmlab info` on a pytorch_model.bin folder: refused in one line without
    --allow-pickle; with it, the loss is transformers' cross-entropy over the same windows
    and the parameter count is transformers' own."""
    folder, ref_model = _pickled_folder("gpt2", hf_model, tmp_path / "gpt2-bin")
    text = TEXT[:400]
    data = tmp_path / "eval.txt"
    data.write_text(text, encoding="utf-8")
    for cmd in (["eval", str(folder), "--data", str(data)], ["info", str(folder)]):
        assert main(cmd) == 2
        assert "--allow-pickle" in _one_line_error(capsys)

    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    ctx = ref_model.config.n_positions
    assert len(ids) > ctx  # several windows
    nll = []
    for s in range(0, len(ids) - 1, ctx):
        y = torch.tensor(ids[s + 1 : s + 1 + ctx])
        logits = _hf_logits(ref_model, torch.tensor([ids[s : s + len(y)]]))
        nll.append(F.cross_entropy(logits[0], y, reduction="none"))  # -log p(y_t | x_≤t)
    loss = float(torch.cat(nll).mean())
    assert main(["eval", str(folder), "--data", str(data), "--allow-pickle"]) == 0
    m = re.search(r"loss ([\d.]+)\s+perplexity [\d.]+\s+over ([\d,]+) tokens", capsys.readouterr().out)
    assert m and float(m.group(1)) == pytest.approx(loss, abs=1e-4)
    assert int(m.group(2).replace(",", "")) == len(ids) - 1

    assert main(["info", str(folder), "--allow-pickle"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"parameters\s+([\d,]+)", out)
    assert m and int(m.group(1).replace(",", "")) == sum(p.numel() for p in ref_model.parameters())
    assert "Hugging Face gpt2 (GPT2LMHeadModel)" in out


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_info_shows_the_hugging_face_origin(name, hf_model, capsys):
    """model_type and architecture, the folder read, dtype (loaded and stored), parameters,
    context and tokenizer size, each from transformers' own config, model and tokenizer."""
    folder, ref_model = hf_model(name)
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    ref, raw = ref_model.config, json.loads((folder / "config.json").read_text())
    lines = dict(re.findall(r"^(\w+)\s+(.*)$", out, flags=re.M))
    arch = raw["architectures"][0]
    assert lines["source"] == f"Hugging Face {name} ({arch}), read from {folder.resolve()}"
    assert int(lines["parameters"].replace(",", "")) == sum(p.numel() for p in ref_model.parameters())
    stored = raw.get("dtype") or raw["torch_dtype"]
    assert lines["dtype"] == f"float32 (stored as {stored})"
    ctx = ref.n_positions if name == "gpt2" else ref.max_position_embeddings
    assert lines["context"] == f"{ctx} tokens"
    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    assert lines["tokenizer"].endswith(f", {vocab} tokens")
    assert "no lmlab training state" in lines["training"]


_GEN_SOURCE = {  # a generation_config.json as a Hub repository ships it (Llama 3 style)
    "bos_token_id": 1,
    "eos_token_id": [2, 0],
    "pad_token_id": 2,
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 40,
    "repetition_penalty": 1.1,
    "max_length": 64,
    "transformers_version": "4.45.0",
}


def test_export_carries_the_generation_config_through(hf_model, tmp_path):
    """transformers reads the exported generation_config.json as it read the source's; lmlab's
    options transformers has no field for are kept aside and read back by lmlab."""
    src = tmp_path / "llama-gen"
    shutil.copytree(hf_model("llama")[0], src)
    (src / "generation_config.json").write_text(json.dumps(_GEN_SOURCE))
    model = lmlab.load(src)
    model.generation_config.update(stop=["\n\n"], presence_penalty=0.5, frequency_penalty=0.25, seed=3)
    out = export_hf(model, tmp_path / "out")

    ref = transformers.GenerationConfig.from_pretrained(src)
    got = transformers.GenerationConfig.from_pretrained(out)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "do_sample", "temperature", "top_p", "top_k"):
        assert getattr(got, key) == getattr(ref, key), key
    assert (got.repetition_penalty, got.max_length) == (ref.repetition_penalty, ref.max_length)
    assert got.stop_strings == ["\n\n"]  # lmlab's `stop`, under transformers' name
    assert got.lmlab_generation == {"presence_penalty": 0.5, "frequency_penalty": 0.25, "seed": 3}

    # back into lmlab: the same decoding options as before the export
    back = lmlab.load(out)
    want = dict(temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1, presence_penalty=0.5)
    opts = LmlabGenerationConfig.from_dict(back.generation_config)
    assert {k: getattr(opts, k) for k in want} == want
    assert (opts.stop, opts.eos_token_id, opts.frequency_penalty, opts.seed) == (["\n\n"], [2, 0], 0.25, 3)
    again = export_hf(back, tmp_path / "again")  # a second round trip changes nothing
    assert json.loads((again / "generation_config.json").read_text()) == json.loads(
        (out / "generation_config.json").read_text()
    )


def test_exported_greedy_generation_config_is_greedy_in_transformers(tmp_path):
    """temperature 0 (lmlab's greedy) exports as do_sample=false: transformers' generate with the
    exported generation_config.json alone gives lmlab's greedy tokens. A model without a pad id
    gets its EOS id as pad in generation_config.json (not in config.json)."""
    model = _lmlab_model(TransformerConfig(n_layer=2, max_seq_len=64, **TRAINED["llama"]))
    model.generation_config = {"bos_token_id": 0, "temperature": 0, "max_new_tokens": 12}  # no EOS
    out = export_hf(model, tmp_path / "hf")
    got = transformers.GenerationConfig.from_pretrained(out)
    assert (got.do_sample, got.bos_token_id, got.max_new_tokens) == (False, 0, 12)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.tensor([model.encode("We know it")])
    with torch.no_grad():
        ids = back.generate(x, attention_mask=torch.ones_like(x), pad_token_id=0)[0, x.shape[1] :].tolist()
    assert ids == model.generate_ids("We know it") and len(ids) == 12

    plain = _lmlab_model(TransformerConfig(n_layer=1, max_seq_len=32, **TRAINED["gpt2"]))  # eos 0, bos 0
    out = export_hf(plain, tmp_path / "plain")
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (0, 0, 0)
    assert "pad_token_id" not in json.loads((out / "config.json").read_text())


def test_export_refuses_a_quantized_model(hf_model, tmp_path, capsys):
    folder, _ = hf_model("llama")
    model = lmlab.load(folder, quantize="int8")
    with pytest.raises(LmlabError, match="export the unquantized checkpoint"):
        export_hf(model, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    # a pre-quantized Hugging Face checkpoint (GPTQ, AWQ, ...) is refused by `lmlab export` too
    gptq = _with_config(folder, tmp_path / "gptq", quantization_config={"quant_method": "gptq", "bits": 4})
    assert main(["export", str(gptq), "--out", str(tmp_path / "q2")]) == 2
    assert "quant_method=gptq" in _one_line_error(capsys)
    assert not (tmp_path / "q2").exists()


# --------------------------------------------------------------------------- export refusals, in flags
_GELU = dict(gated_mlp=False, activation="gelu")  # what `lmlab train --mlp gelu` sets


@pytest.mark.parametrize(
    ("settings", "origin", "have", "needs"),
    [
        (  # --mlp: the walkthrough's case, --mlp gelu with the default --norm rmsnorm
            dict(pos="rope", norm="rmsnorm", **_GELU),
            None,
            "--pos rope --norm rmsnorm --mlp gelu",
            ["Llama needs --mlp swiglu", "GPT-NeoX needs --norm layernorm",
             "GPT-2 needs --pos learned|sinusoidal --norm layernorm"],
        ),
        (  # --pos
            dict(pos="learned", norm="rmsnorm"),
            None,
            "--pos learned --norm rmsnorm --mlp swiglu",
            ["Llama needs --pos rope", "GPT-2 needs --norm layernorm --mlp gelu",
             "GPT-NeoX needs --pos rope --norm layernorm --mlp gelu"],
        ),
        (  # --norm
            dict(pos="sinusoidal", norm="rmsnorm", **_GELU),
            None,
            "--pos sinusoidal --norm rmsnorm --mlp gelu",
            ["GPT-2 needs --norm layernorm", "Llama needs --pos rope --mlp swiglu",
             "GPT-NeoX needs --pos rope --norm layernorm"],
        ),
        (  # --n-kv-head (grouped-query attention): only Llama has it
            dict(pos="learned", norm="layernorm", n_kv_head=2, **_GELU),
            None,
            "--pos learned --norm layernorm --mlp gelu --n-kv-head 2",
            ["GPT-2 needs --n-kv-head 4 (= --n-head)",
             "GPT-NeoX needs --pos rope --n-kv-head 4 (= --n-head)",
             "Llama needs --pos rope --norm rmsnorm --mlp swiglu"],
        ),
        (  # --bias: an imported Mistral (no biases) given biases and LayerNorm
            dict(pos="rope", norm="layernorm", qkv_bias=True, proj_bias=True, mlp_bias=True),
            "mistral",
            "--pos rope --norm layernorm --mlp swiglu --bias",
            ["Llama needs --norm rmsnorm", "GPT-NeoX needs --mlp gelu",
             "Mistral needs --norm rmsnorm --no-bias"],
        ),
        (  # fields no `lmlab train` flag sets are named as config fields
            dict(pos="learned", norm="layernorm", head_dim=16, **_GELU),
            None,
            "--pos learned --norm layernorm --mlp gelu, head_dim=16",
            ["GPT-2 needs head_dim = d_model/n_head", "GPT-NeoX needs --pos rope, head_dim = d_model/n_head"],
        ),
        (
            dict(pos="learned", norm="layernorm", parallel_residual=True, **_GELU),
            None,
            "--pos learned --norm layernorm --mlp gelu, parallel_residual=True",
            ["GPT-2 needs parallel_residual=False", "GPT-NeoX needs --pos rope"],
        ),
        (
            dict(pos="learned", norm="layernorm", embed_scale=2.0, **_GELU),
            None,
            "--pos learned --norm layernorm --mlp gelu, embed_scale=2",
            ["GPT-2 needs embed_scale=1", "GPT-NeoX needs --pos rope, embed_scale=1"],
        ),
        (
            dict(pos="rope", norm="rmsnorm", rotary_dim=4),  # head_dim 8: partial rotary
            None,
            "--pos rope --norm rmsnorm --mlp swiglu, rotary_dim=4",
            ["Llama needs rotary_dim=8 (= head_dim)", "GPT-NeoX needs --norm layernorm --mlp gelu"],
        ),
    ],
)
def test_export_refusal_names_the_train_flags(settings, origin, have, needs, tmp_path):
    """Each reason is said in the `lmlab train` flags that set it (the user never saw
    ``gated_mlp``), with what every family still needs, nearest first."""
    model = _lmlab_model(TransformerConfig(n_layer=1, n_head=4, d_model=32, max_seq_len=32, **settings))
    if origin:
        model.module.hf_origin = {"model_type": origin}
    with pytest.raises(LmlabError, match="no exact Hugging Face equivalent") as e:
        export_hf(model, tmp_path / "hf")
    msg = str(e.value)
    assert msg.startswith(f"this model ({have}) has no exact Hugging Face equivalent: "), msg
    parts = msg.split(": ", 1)[1].split("; ")
    assert parts[: len(needs)] == needs, msg
    assert "\n" not in msg and "gated_mlp" not in msg
    assert not (tmp_path / "hf").exists()


def test_export_refusal_names_an_activation_transformers_lacks(tmp_path):
    """An activation no Hugging Face family has: only a config edited in Python gets one
    (TransformerConfig validates its activation), but the refusal still names it."""
    model = _lmlab_model(TransformerConfig(n_layer=1, n_head=4, d_model=32, max_seq_len=32, pos="rope"))
    model.module.config.activation = "softplus"
    with pytest.raises(LmlabError, match="no exact Hugging Face equivalent") as e:
        export_hf(model, tmp_path / "hf")
    assert "activation='softplus'" in str(e.value)
    assert "Llama needs activation in gelu, gelu_tanh, gelu_new, silu, relu" in str(e.value)
