"""Tiny lmlab checkpoints for tests, built in a fraction of a second.

A test that needs "a model on disk" should not train one: a randomly initialised
Transformer exercises the same loading, decoding and CLI code. The three tokenizer
kinds differ in how ids become text, which is what generation tests care about:

- char: one token per code point, joined with nothing (``decoders.Fuse``);
- bpe: byte-level BPE, where one Chinese character may span several byte tokens;
- word: WordLevel over whitespace-split words, decoded by joining words with spaces.

Also what several test modules share, written once: the training corpus, a run's
metrics and saved step, and ``lmlab`` started in a subprocess as a user starts it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import lmlab
from lmlab.models.config import TransformerConfig
from lmlab.models.loading import write_checkpoint
from lmlab.models.transformer import Transformer
from lmlab.tokenizer import EOT, train_bpe_tokenizer, train_char_tokenizer

#: The repository root: lmlab subprocesses run here and import this checkout.
REPO = Path(__file__).resolve().parents[1]

#: A few lines of dialogue; a training corpus repeats them.
SHAKESPEARE_LINES = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
)
#: A few KB of text for training runs in tests (tests never read ../shared).
SHAKESPEARE_TEXT = SHAKESPEARE_LINES * 40

#: Training text for the tokenizers: ASCII prose, punctuation, and Chinese (3 UTF-8 bytes each).
TOKENIZER_TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune.\n"
    "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？\n"
) * 8

TOKENIZER_KINDS = ("char", "bpe", "word")


def char_tokenizer(text: str = TOKENIZER_TEXT) -> Tokenizer:
    return train_char_tokenizer([text])


def bpe_tokenizer(text: str = TOKENIZER_TEXT, vocab_size: int = 300) -> Tokenizer:
    """Byte-level BPE with few merges, so most Chinese characters stay as 3 byte tokens."""
    return train_bpe_tokenizer([text], vocab_size=vocab_size)


def word_tokenizer(text: str = TOKENIZER_TEXT) -> Tokenizer:
    """WordLevel over ``Whitespace`` pre-tokens; the decoder joins the words with spaces
    (the WordPiece decoder without clean-up: words not starting with ``##`` get a space)."""
    words = sorted(set(w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)))
    vocab = {EOT: 0, "[UNK]": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([EOT, "[UNK]"])
    return tok


def make_tokenizer(kind: str) -> Tokenizer:
    return {"char": char_tokenizer, "bpe": bpe_tokenizer, "word": word_tokenizer}[kind]()


def tiny_model(
    vocab_size: int,
    *,
    pos: str = "learned",
    max_seq_len: int = 32,
    n_layer: int = 2,
    d_model: int = 32,
    n_head: int = 2,
    init_std: float = 0.3,
    seed: int = 0,
    **config: Any,
) -> Transformer:
    """A random Transformer in eval mode. ``init_std`` is larger than GPT-2's 0.02 so the
    logits are far from uniform: greedy choices are then not decided by rounding noise."""
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        vocab_size=vocab_size,
        n_layer=n_layer,
        n_head=n_head,
        d_model=d_model,
        max_seq_len=max_seq_len,
        pos=pos,
        init_std=init_std,
        **config,
    )
    return Transformer(cfg).eval()


def tiny_checkpoint(
    folder: str | Path,
    kind: str = "char",
    *,
    generation_config: dict[str, Any] | None = None,
    tokenizer: Tokenizer | None = None,
    **model_options: Any,
) -> Path:
    """Write a random tiny checkpoint with a ``kind`` tokenizer into ``folder`` (new).

    The generation config defaults to a BOS token (``<|endoftext|>``) and no EOS, so a
    run always produces exactly ``max_new_tokens`` tokens unless a test asks otherwise.
    """
    tok = tokenizer or make_tokenizer(kind)
    model = tiny_model(tok.get_vocab_size(), **model_options)
    gen = {"bos_token_id": tok.token_to_id(EOT)} if generation_config is None else generation_config
    return write_checkpoint(folder, model, tok, gen)


#: the Seq2SeqConfig settings of a model that exports as Marian (``lmlab train --task translate
#: --post-norm --norm layernorm --mlp gelu --bias``)
MARIAN_SHAPE = dict(prenorm=False, sinusoidal_layout="halves", norm="layernorm", norm_bias=True, attn_bias=True,
                    mlp_bias=True, activation="gelu", gated_mlp=False)  # fmt: skip


def tiny_seq2seq_checkpoint(folder: str | Path, seed: int = 0, **shape: Any) -> Path:
    """A random tiny Transformer encoder-decoder with a BPE tokenizer set up as
    ``lmlab train --task translate`` sets it up (a ``<pad>`` token; sources end with EOS);
    ``shape``: Seq2SeqConfig settings (e.g. MARIAN_SHAPE)."""
    from tokenizers import processors

    from lmlab.models.config import Seq2SeqConfig
    from lmlab.models.seq2seq import Seq2SeqTransformer

    tok = bpe_tokenizer()
    tok.add_special_tokens(["<pad>"])
    eos = tok.token_to_id(EOT)
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOT}", special_tokens=[(EOT, eos)])
    torch.manual_seed(seed)
    cfg = Seq2SeqConfig(vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, d_model=32, max_source_len=64,
                        max_target_len=32, dropout=0.0, init_std=0.3, **shape)  # fmt: skip
    gen = {"eos_token_id": eos, "bos_token_id": eos, "decoder_start_token_id": eos,
           "pad_token_id": tok.token_to_id("<pad>"), "max_new_tokens": 20}  # fmt: skip
    return write_checkpoint(folder, Seq2SeqTransformer(cfg).eval(), tok, gen)


# --------------------------------------------------------------------------- corpora and runs
def write_corpus(folder: Path, text: str = SHAKESPEARE_TEXT) -> Path:
    """``folder/corpus.txt`` holding ``text`` (UTF-8): a --data file for a training run."""
    path = folder / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's token cache ($LMLAB_CACHE), kept out of the user's own cache."""
    return tmp_path_factory.getbasetemp() / "lmlab-cache"


def train_once(tmp_path_factory: pytest.TempPathFactory, name: str, **options: Any) -> Path:
    """``lmlab.train(**options)`` into a new folder ``name``: one run that a module's tests share.

    A module-scoped fixture runs before the autouse fixture that sets $LMLAB_CACHE, so the
    same private cache is set here for the run.
    """
    out = tmp_path_factory.mktemp("run") / name
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", str(private_cache(tmp_path_factory)))
        lmlab.train(out=str(out), **options)
    return out


def read_metrics(out: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, one dict per line."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def last_step(out: Path) -> int:
    """The step of the last complete line of a running job's metrics.jsonl (0 if none)."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError):
            continue  # a line the job is still writing
    return 0


def saved_step(out: Path) -> int:
    """The step of the checkpoint in ``out`` (its trainer_state.json)."""
    return json.loads((out / "trainer_state.json").read_text())["step"]


# --------------------------------------------------------------------------- the CLI in a subprocess
def lmlab_cmd(*args: str) -> list[str]:
    """``python -m lmlab ARGS`` with this interpreter: the command line as a user runs it."""
    return [sys.executable, "-m", "lmlab", *args]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of an lmlab subprocess, built when it starts (so $LMLAB_CACHE is the
    test's own): offline, one thread (as conftest sets for this process), this checkout."""
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return {**os.environ, **env, **extra}


def run_lmlab(
    *args: str, check_rc: int | None = 0, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
    """Run ``lmlab ARGS`` to its end with stdout and stderr captured as text; unless
    ``check_rc`` is None, assert its exit status (stderr is the message). ``env``: extra
    environment variables."""
    proc = subprocess.run(
        lmlab_cmd(*args), capture_output=True, text=True, env=cli_env(**env), cwd=REPO, timeout=timeout
    )
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


def popen(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` (an lmlab or torchrun command) with stdout and stderr piped as text."""
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or cli_env(), cwd=REPO
    )


def finish(p: subprocess.Popen, timeout: float = 240, rc: int = 0) -> tuple[str, str]:
    """Wait for ``p`` and assert it exited with status ``rc``; returns (stdout, stderr)."""
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == rc, err[-3000:]
    return out, err


def wait_for_step(out: Path, n: int, p: subprocess.Popen, timeout: float = 120) -> int:
    """Wait until the run ``p`` writing ``out`` has logged step ``n``; returns the step logged.
    Fails if ``p`` ends first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while (step := last_step(out)) < n:
        if p.poll() is not None:
            pytest.fail(f"the run ended (rc {p.returncode}) before step {n}: {p.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"the run never reached step {n}"
        time.sleep(0.01)
    return step


# --------------------------------------------------------------------------- gradient accumulation
def assert_grads_of_one_batch(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss: float, grads: dict[str, torch.Tensor]
) -> None:
    """The reference for accumulated micro-batches: ``loss`` and ``grads`` must equal (within
    1e-6) the mean cross-entropy over all of (x, y) as one batch and its gradient, computed
    here from the model's logits (k equal micro-batches: ∇(1/k Σ_i L_i) = ∇ of the mean)."""
    model.zero_grad(set_to_none=True)
    logits, _ = model(x)
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    ref.backward()
    assert loss == pytest.approx(ref.item(), abs=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=0, msg=n)


@contextlib.contextmanager
def recorded_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Every warning raised inside the block, each time it is raised (not once per line)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def lmlab_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """The messages of the LmlabWarnings among ``caught`` (what the CLI prints as
    ``lmlab: warning: ...``)."""
    from lmlab.messages import LmlabWarning

    return [str(w.message) for w in caught if issubclass(w.category, LmlabWarning)]


def fake_clock(monkeypatch: pytest.MonkeyPatch, seconds_per_step: Any) -> list[float]:
    """A deterministic --time run: the trainer's clock stands still except in a step,
    which takes ``seconds_per_step(now)`` (and trains nothing: the schedule is the test)."""
    from lmlab.training.trainer import Trainer

    clock = [0.0]
    monkeypatch.setattr(sys.modules["lmlab.training.trainer"], "_clock", lambda: clock[0])

    def step(self, step):  # noqa: ARG001
        clock[0] += seconds_per_step(clock[0])
        return 2.0

    monkeypatch.setattr(Trainer, "train_step", step)
    return clock


# --------------------------------------------------------------------------- tiny HF encoders
#: words of the tiny encoders' WordPiece vocabulary (English and Chinese; tests pick from them)
ENCODER_WORDS = (
    "the a an cat dog sat on mat in house great film bad awful good movie what where who is was did it not "
    "very and of to zebra 猫 坐 在 垫 子 上 谁 什 么 斑 马 电 影 很 好"
).split()
ENCODER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_vocab() -> dict[str, int]:
    pieces = ENCODER_SPECIALS + ENCODER_WORDS + ["##s", "##ed", "##ing", ".", ",", "?", "!"]
    return {t: i for i, t in enumerate(pieces)}


def wordpiece_tokenizer() -> Tokenizer:
    """BERT's WordPiece over ``wordpiece_vocab()``, with [CLS] A [SEP] B [SEP]."""
    from tokenizers.implementations import BertWordPieceTokenizer

    return BertWordPieceTokenizer(wordpiece_vocab(), lowercase=True)._tokenizer


def roberta_tokenizer() -> Tokenizer:
    """A byte-level BPE trained on a few KB, specials at RoBERTa's ids, <s> A </s></s> B </s>."""
    from tokenizers import ByteLevelBPETokenizer, processors

    bpe = ByteLevelBPETokenizer()
    text = [TOKENIZER_TEXT, " ".join(ENCODER_WORDS) * 20]
    bpe.train_from_iterator(text, vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                            show_progress=False)  # fmt: skip
    tok = bpe._tokenizer
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True)
    return tok


def randomize_(m: torch.nn.Module, std: float = 0.3) -> None:
    """Weights far from their init (norm weights near 1, biases nonzero), so that a mapping
    error anywhere shows in the outputs."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() > 1:
                p.normal_(0, std)
            elif "norm" in name.lower():
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0, 0.1)


def tiny_hf_encoder(
    folder: str | Path, family: str = "bert", task: str = "classify", seed: int = 0,
    labels: tuple[str, ...] = ("negative", "positive"), tokenizer_files: str = "json", **config: Any,
) -> Path:  # fmt: skip
    """A random ``{Bert,DistilBert,Roberta,XLMRoberta}For{SequenceClassification,QuestionAnswering}``
    saved with its fast tokenizer (``tokenizer_files="vocab"``: BERT's vocab.txt / RoBERTa's
    vocab.json + merges.txt only, no tokenizer.json)."""
    import transformers as T

    torch.manual_seed(seed)
    folder = Path(folder)
    roberta = family in ("roberta", "xlm-roberta")
    tok = roberta_tokenizer() if roberta else wordpiece_tokenizer()
    V = tok.get_vocab_size()
    label_kw = dict(id2label=dict(enumerate(labels)), label2id={v: i for i, v in enumerate(labels)})
    if task == "span":
        label_kw = {}
    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=V)
    cfg = {
        "bert": lambda: T.BertConfig(**size, max_position_embeddings=64, **label_kw, **config),
        "distilbert": lambda: T.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=37, vocab_size=V,
                                                 max_position_embeddings=64, **label_kw, **config),
        "roberta": lambda: T.RobertaConfig(**size, max_position_embeddings=66, pad_token_id=1, type_vocab_size=1,
                                           **label_kw, **config),
        "xlm-roberta": lambda: T.XLMRobertaConfig(**size, max_position_embeddings=66, pad_token_id=1,
                                                  type_vocab_size=1, **label_kw, **config),
    }[family]()  # fmt: skip
    prefix = {"bert": "Bert", "distilbert": "DistilBert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta"}[family]
    head = "ForSequenceClassification" if task == "classify" else "ForQuestionAnswering"
    model = getattr(T, prefix + head)(cfg).eval()
    randomize_(model)
    model.save_pretrained(folder)
    if roberta:
        fast = T.RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                      cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")  # fmt: skip
    else:
        fast = T.BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                   cls_token="[CLS]", mask_token="[MASK]")  # fmt: skip
    fast.model_max_length = cfg.max_position_embeddings - (2 if roberta else 0)
    fast.save_pretrained(folder)
    if tokenizer_files == "vocab":
        (folder / "tokenizer.json").unlink()
        if roberta:
            tok.model.save(str(folder))  # vocab.json + merges.txt
        else:
            (folder / "vocab.txt").write_text("".join(t + "\n" for t in sorted(wordpiece_vocab(), key=wordpiece_vocab().get)),
                                              encoding="utf-8")  # fmt: skip
    return folder


def assert_resume_is_exact(trainer_cls: type, monkeypatch: pytest.MonkeyPatch, a: Path, b: Path, **opts: Any) -> None:
    """Train ``opts`` into ``a`` uninterrupted; into ``b`` with a crash at step 15 and a resume:
    the two final checkpoints are equal, weight for weight (``trainer_cls``: the task's Trainer)."""
    from safetensors.torch import load_file

    import lmlab

    lmlab.train(out=str(a), **opts)
    real = trainer_cls.train_step

    def crash_after_15(self: Any, step: int) -> float:
        if step == 15:
            raise RuntimeError("power cut")
        return real(self, step)

    monkeypatch.setattr(trainer_cls, "train_step", crash_after_15)
    with pytest.raises(RuntimeError, match="power cut"):
        lmlab.train(out=str(b), **opts)
    monkeypatch.setattr(trainer_cls, "train_step", real)
    assert json.loads((b / "trainer_state.json").read_text())["step"] == opts["save_every"]  # (save_every=10)
    lmlab.train(resume=str(b))
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
