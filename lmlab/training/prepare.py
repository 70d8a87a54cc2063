"""The Trainer's set-up: everything a run needs before its first step.

Check ``--out``; make or read the tokenizer and the model (new, ``--resume``d from a
checkpoint, or ``--init`` from another model); tokenize the corpus and split it; the
optimizer, the step budget, the validation windows; under torchrun, join the process
group and wrap the model in DDP. :class:`~lmlab.training.trainer.Trainer` inherits these
methods and adds the steps and the loop.
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from lmlab.checkpoint import RunDir, RunLock, read_json, unwrap
from lmlab.data import TEXT_SUFFIXES, iter_corpus, load_corpus, resolve_data, sample_starts, step_generator
from lmlab.errors import LmlabError
from lmlab.messages import say
from lmlab.models import build_model
from lmlab.models.config import RECURRENT, RNNConfig
from lmlab.models.loading import load_weights, read_checkpoint, step_folder
from lmlab.runtime import resolve_device
from lmlab.tokenizer import EOT, load_tokenizer, tokenizer_kind, train_tokenizer
from lmlab.training import distributed
from lmlab.training.average import WeightAverage
from lmlab.training.config import TrainConfig, check_batch_split, parse_duration
from lmlab.training.state import load_training_state, rank_seed


class TrainerSetup:
    """The set-up half of the Trainer: ``setup()`` makes ``self.model``, ``self.tok``,
    ``self.optimizer``, ``self.train_ids``/``self.val_ids``, ``self.state`` (step,
    tokens, elapsed time: what trainer_state.json keeps) and the step budget."""

    cfg: TrainConfig
    given: set[str]  # the options set explicitly

    def setup(self) -> None:
        self.run = RunDir(self.cfg.out)
        self.created_out: list[Path] = []  # the folders this run made for --out, innermost first
        try:
            self._setup()
        except BaseException:
            self._remove_empty_out()
            raise

    def _remove_empty_out(self) -> None:
        """A run that failed before it wrote anything leaves no empty --out behind: the
        folders it made itself go, if still empty (``rmdir`` removes nothing else), and
        so does its lock file in a folder it made."""
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.release()
            self.lock = None
            if lock.created:
                lock.path.unlink(missing_ok=True)
        for d in self.created_out:
            try:
                d.rmdir()
            except OSError:  # not empty, or gone: it stays, and so do its parents
                break
        self.created_out = []

    def _make_out(self) -> None:
        """Create --out (and missing parents), remembering which folders were new."""
        root = self.run.root
        missing = [d for d in (root, *root.parents) if not d.exists() and not d.is_symlink()]
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LmlabError(
                f"cannot create --out {self.cfg.out} ({e.strerror}); choose another folder"
            ) from None
        self.created_out = missing

    def _setup(self) -> None:
        cfg = self.cfg
        resuming = cfg.resume is not None
        # Under torchrun: join the process group (gloo on CPU, nccl on CUDA). Rank 0
        # prepares the run first (--out, the tokenizer, the token cache, a download) while
        # the others wait; then they do the same from its tokenizer and caches.
        self.dist = distributed.setup(resolve_device(cfg.device))
        self.device = self.dist.device
        shared = {} if self.dist.is_main else self.dist.wait_for_main()
        self.shared = shared  # what rank 0 made for every rank (its tokenizers)
        try:
            mcfg, corpus = self._prepare(resuming, shared.get("tokenizer"))
        except BaseException as e:
            self.dist.release(error=str(e) if isinstance(e, LmlabError) else f"rank 0 failed: {e!r}")
            raise
        if self.dist.active:
            self.dist.release(tokenizer=self.tok.to_str(), **self._shared_extras())
        if self.dist.rank > 0:  # dropout: each rank its own stream (rank 0 keeps one process's)
            torch.manual_seed(rank_seed(cfg.seed, self.dist.rank))
        self._setup_rest(mcfg, corpus, resuming)

    def _prepare(self, resuming: bool, tokenizer: str | None) -> tuple[Any, Any]:
        """Check --out; make or read the tokenizer and the model; tokenize the corpus."""
        cfg = self.cfg
        if self.dist.is_main:
            # One writer per run folder, for the whole run: a second `lmlab train` (or
            # --resume, or export) on it stops here, naming the first (RunLock).
            self._make_out()
            self.lock = RunLock(self.run.root, f"lmlab train --out {cfg.out}").acquire()
            self.run.remove_stale_temporaries()  # half-written saves of a killed run
        if self.dist.is_main and not resuming and self.run.has_checkpoint():
            if not cfg.overwrite:
                raise LmlabError(distributed.occupied_out_message(cfg.out, f"lmlab train --resume {cfg.out}"))
            self.run.clear()
        torch.manual_seed(cfg.seed)

        self.state: dict[str, Any] = {"step": 0, "tokens": 0, "elapsed": 0.0, "best_val": None}
        if resuming:
            mcfg, tensors, self.tok, self.gen_cfg = read_checkpoint(cfg.resume)
            self.state.update(read_trainer_state(Path(cfg.resume)))
            self.state["saved_step"] = self.state["step"]  # the checkpoint resumed from
        elif cfg.init is not None:  # fine-tune: an lmlab checkpoint, a HF folder or Hub id
            from lmlab.hf import load_any

            source = load_any(cfg.init, dtype="float32", allow_pickle=cfg.allow_pickle)
            self.tok, mcfg, self.gen_cfg = source.tokenizer, source.module.config, dict(source.generation_config)
            say(f"lmlab: starting from {cfg.init} ({source.module.num_parameters() / 1e6:.1f}M parameters)")
        else:
            self.tok = Tokenizer.from_str(tokenizer) if tokenizer else self._new_tokenizer()
            mcfg = self._new_model_config()
            self.gen_cfg = self._new_generation_config(mcfg)
        if cfg.init is not None and not resuming:
            self.model, mcfg = self._init_model(source)
        else:
            self.model = build_model(mcfg)
        if resuming:
            load_weights(self.model, tensors, cfg.resume)
        self.model.to(self.device)
        # A model in training may decode between steps (dev BLEU/ROUGE, samples): its packed
        # copies must not replace its weights, which the optimizer and the weight average write
        self.model.pack_in_place = False
        self.seq_len = self._window(mcfg, resuming)
        if cfg.init is not None and not resuming:
            self._adopt_init_config(getattr(mcfg, "body", mcfg))
        check_step_memory(cfg.batch_size // cfg.grad_accum, self.seq_len, mcfg.vocab_size)
        return mcfg, self._load_data(resuming)

    # ------------------------------------------------------------------ task hooks
    # What differs between tasks (language modelling here; translation in
    # lmlab.training.seq2seq): the tokenizer a new run trains, the generation settings it
    # stores, the data, and how the data splits into training and validation.
    def _new_tokenizer(self) -> Tokenizer:
        return make_tokenizer(self.cfg)

    def _shared_extras(self) -> dict[str, str]:
        """More that rank 0 hands every rank under torchrun (an encoder-decoder's target tokenizer)."""
        return {}

    def _new_model_config(self) -> Any:
        return self.cfg.model_config(self.tok.get_vocab_size())

    def _init_model(self, source: Any) -> tuple[Any, Any]:
        """The model --init starts from, and its config (a task wraps it: a classifier's body)."""
        head = getattr(source.module.config, "head", None)
        if head is not None:
            kind = {"classify": "a classifier", "span": "a QA model"}.get(head, "a masked-LM encoder (--task mlm)")
            raise LmlabError(f"--init {self.cfg.init}: --task lm continues a language model; this is {kind}, which "
                             "predicts no next token" + (": fine-tune it with --task classify or qa" if head == "mlm" else ""))  # fmt: skip
        return source.module.train(), source.module.config

    def _new_generation_config(self, mcfg: Any) -> dict[str, Any]:
        gen: dict[str, Any] = {"eos_token_id": self.tok.token_to_id(EOT), "bos_token_id": self.tok.token_to_id(EOT)}
        if mcfg.model_type == "transformer":
            # A default that fits the context, so a plain `lmlab generate RUN --prompt ...`
            # does not slide past it (and warn); --max-new-tokens asks for more.
            gen["max_new_tokens"] = min(200, mcfg.max_seq_len // 2)
        return gen

    def _load_data(self, resuming: bool) -> Any:
        cfg = self.cfg
        gone = cfg.data != "builtin" and not any(c in cfg.data for c in "*?[") and not Path(cfg.data).expanduser().exists()
        if resuming and gone:
            raise LmlabError(
                f"the data this run trains on, {cfg.data} (stored in {cfg.resume}/trainer_state.json), is no longer "
                "there; put it back at that path to resume (a resumed run reads the same text)"
            )
        if cfg.data != "builtin" and Path(cfg.data).expanduser().is_dir():
            say(folder_summary(Path(cfg.data).expanduser()))
        return load_corpus(cfg.data, self.tok, cfg.encoding_errors)

    def _split_data(self, mcfg: Any, corpus: Any) -> None:
        """Training and validation tokens, and the validation windows."""
        cfg = self.cfg
        self.train_ids, self.val_ids = corpus.split(cfg.val_fraction, self.seq_len)
        if cfg.stateful and (len(self.train_ids) - 1) // cfg.batch_size < self.seq_len:
            raise LmlabError(
                f"--stateful reads the {len(self.train_ids):,} training tokens as --batch-size "
                f"{cfg.batch_size} parallel streams, each shorter than one window of --max-seq-len "
                f"{mcfg.max_seq_len}; give more text, a smaller --batch-size or a smaller --max-seq-len"
            )
        say(
            f"lmlab: corpus {corpus.name}: {len(corpus.ids):,} tokens; train {len(self.train_ids):,} "
            f"(first {1 - cfg.val_fraction:.0%}), validation {len(self.val_ids):,} (last {cfg.val_fraction:.0%})"
        )
        self.val_starts = (
            sample_starts(
                len(self.val_ids),
                self.seq_len,
                cfg.eval_batches * cfg.batch_size,
                step_generator(cfg.seed, 0, stream=1),
            )
            if len(self.val_ids) > self.seq_len
            else None
        )

    def _window(self, mcfg: Any, resuming: bool) -> int:
        """The training window: the model's context; with --init, --max-seq-len (default 64:
        a 1024-token window is slow on a CPU), within the context of a Transformer (an
        RNN has none: its max_seq_len is only the window it was trained on)."""
        cfg = self.cfg
        if cfg.init is None:
            return mcfg.max_seq_len
        bounded = getattr(self.model, "bounded_context", True)
        if "max_seq_len" in self.given and bounded and cfg.max_seq_len > mcfg.max_seq_len:
            raise LmlabError(
                f"--max-seq-len {cfg.max_seq_len} is longer than the context of {cfg.init} "
                f"({mcfg.max_seq_len} tokens); give --max-seq-len {mcfg.max_seq_len} or less"
            )
        if not bounded and ("max_seq_len" in self.given or resuming):
            return cfg.max_seq_len
        return min(cfg.max_seq_len, mcfg.max_seq_len)

    def _adopt_init_config(self, mcfg: Any) -> None:
        """With --init, the stored train_config says what was used: the model's own
        architecture and tokenizer (config.json has every detail), and the window."""
        cfg = self.cfg
        if isinstance(mcfg, RNNConfig):
            arch = dict(model=mcfg.cell, hidden_size=mcfg.hidden_size)
        elif getattr(mcfg, "model_type", "") == "encoder":
            arch = dict(model="encoder", n_head=mcfg.n_head, norm=mcfg.norm, tie_embeddings=False)
        else:
            arch = dict(
                model="gpt",
                n_head=mcfg.n_head,
                n_kv_head=mcfg.n_kv_head,
                pos=mcfg.pos,
                norm=mcfg.norm,
                mlp="swiglu" if mcfg.gated_mlp else "gelu",
                bias=any((mcfg.norm_bias, mcfg.qkv_bias, mcfg.proj_bias, mcfg.mlp_bias)),
            )
        arch.update(n_layer=mcfg.n_layer, d_model=mcfg.d_model, tie_embeddings=getattr(mcfg, "tie_embeddings", False))
        arch.update(dropout=mcfg.dropout, tokenizer=cfg.init, vocab_size=self.tok.get_vocab_size())
        for k, v in arch.items():
            setattr(cfg, k, v)
        cfg.max_seq_len = self.seq_len
        if cfg.stateful and cfg.model not in RECURRENT:
            raise LmlabError(
                f"--stateful needs a recurrent model; {cfg.init} is a Transformer, which has no "
                "state to carry from one chunk to the next: drop --stateful"
            )

    def _setup_rest(self, mcfg: Any, corpus: Any, resuming: bool) -> None:
        cfg = self.cfg
        self._split_data(mcfg, corpus)
        say(
            f"lmlab: model {mcfg.n_params_hint if hasattr(mcfg, 'n_params_hint') else ''} "
            f"{self.model.num_parameters() / 1e6:.2f}M parameters, tokenizer "
            f"{tokenizer_kind(self.tok)} ({self.tok.get_vocab_size()} tokens), device {self.device}, "
            f"precision {cfg.precision}"
        )
        self.optimizer = self._make_optimizer()
        stored: dict[str, torch.Tensor] = {}
        if resuming:
            stored = load_training_state(
                Path(cfg.resume),
                self.model,
                self.optimizer,
                device=self.device,
                rank=self.dist.rank,
                seed=cfg.seed,
                step=self.state["step"],
            )
        self.max_steps = self.state.get("max_steps") or cfg.steps
        if cfg.steps is not None and resuming:
            self.max_steps = cfg.steps  # --steps given again extends (or shortens) the run
            self.state["lr_plan"] = None  # and the schedule is the plain one to the new end
        self.time_budget = parse_duration(cfg.time) if cfg.time is not None else None
        self.lr_end = self.max_steps  # where the lr schedule ends; a --time run moves it
        if resuming and cfg.steps is None and "lr_end" in self.state:
            # The schedule's own end, not where the run stopped: a --time run cut short by
            # its hard stop (max_steps = that step) goes on from its lr, not from min_lr.
            self.lr_end = self.state["lr_end"]
        self.state["lr_end"] = self.lr_end
        if resuming and cfg.extend_time and self.time_budget is not None:
            self.max_steps = None  # measured again: T more seconds from here
            self.time_budget += self.state.get("elapsed", 0.0)
        if self.max_steps is None and cfg.time is None:
            self.max_steps = self.lr_end = cfg.DEFAULT_STEPS
        if resuming:
            done = self.state["step"]
            if self.max_steps is not None and done >= self.max_steps:
                say(finished_message(cfg.resume, done, self.max_steps))
            else:
                total = self.max_steps if self.max_steps is not None else f"--time {cfg.time}"
                say(f"lmlab: resuming {cfg.resume} at step {done} (of {total})")
        self._setup_ddp()
        # --ema-decay: made after DDP's broadcast of rank 0's weights, so every rank's average is the same
        if cfg.ema_decay > 0:
            self.average = WeightAverage(self.model, cfg.ema_decay)
            if resuming:
                self.average.resume(stored, cfg.resume)

    def _setup_ddp(self) -> None:
        """Say how the global batch is split; under torchrun, wrap the model in DDP."""
        cfg = self.cfg
        W, k = self.dist.world_size, cfg.grad_accum
        check_batch_split(cfg.batch_size, k, W)  # the world joined, not the one planned
        if W > 1 or k > 1:  # B = W processes × k micro-steps × b sequences
            say(
                f"lmlab: batch {cfg.batch_size} sequences per step = {W} process{'es' if W > 1 else ''} "
                f"× {k} micro-step{'s' if k > 1 else ''} × {cfg.batch_size // (W * k)} sequences"
                + (f" (DDP, {self.dist.backend})" if self.dist.active else "")
            )
        if self.dist.active:
            # DDP broadcasts rank 0's weights now and averages the gradients in backward.
            # Buffers (RoPE tables) are computed, not learned: no need to sync them each step.
            DDP = torch.nn.parallel.DistributedDataParallel
            no_sync_buffers = (
                {"forward_sync_buffers": False}  # torch >= 2.13's name
                if "forward_sync_buffers" in inspect.signature(DDP).parameters
                else {"broadcast_buffers": False}
            )
            self.model = DDP(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **no_sync_buffers,
            )

    def close(self) -> None:
        """Leave the process group this Trainer joined (nothing outside torchrun) and let go
        of the run folder."""
        if getattr(self, "dist", None) is not None:
            self.dist.close()
        if getattr(self, "lock", None) is not None:
            self.lock.release()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; weight decay only on matrices (embeddings, linear weights), not on
        biases and norm gains, which decay would pull toward zero for no benefit."""
        cfg = self.cfg
        decay, no_decay = [], []
        for _, p in unwrap(self.model).named_parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


def finished_message(folder: str, done: int, end: int) -> str:
    """``--resume`` on a run already at (or past) its step count: the one thing it says,
    and the two ways on: a larger total (--steps), or more time (--time, from now)."""
    where = f"already at its last step, {done}" if done == end else f"at step {done}, past --steps {end}"
    return (
        f"lmlab: {folder} is {where}: nothing to train. To train it further, give a new total, "
        f"`lmlab train --resume {folder} --steps {done + 1000}`, or more time, "
        f"`lmlab train --resume {folder} --time 5m`"
    )


def folder_summary(folder: Path) -> str:
    """One line on what ``--data FOLDER`` reads: the files ``resolve_data`` takes (not
    hidden, a text extension or none) and what it skips and why, so that a folder of PDFs
    with three notes in it does not silently train on the three notes."""
    read, other, hidden = 0, [], []
    for _root, dirs, files in os.walk(folder):
        hidden += [d + "/" for d in dirs if d.startswith(".")]  # not entered: counted once
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            suffix = Path(name).suffix.lower()
            if name.startswith("."):
                hidden.append(name)
            elif suffix in TEXT_SUFFIXES or suffix == "":
                read += 1
            else:
                other.append(suffix)
    line = f"lmlab: data: {read} file{'s' * (read != 1)} from {folder}/"
    reasons = []
    if other:
        kinds = sorted(set(other))
        shown = ", ".join(kinds[:4]) + (", ..." if len(kinds) > 4 else "")
        reasons.append(f"{len(other)} with other extensions: {shown}")
    if hidden:
        reasons.append(f"{len(hidden)} hidden: {', '.join(sorted(hidden)[:3])}" + (", ..." if len(hidden) > 3 else ""))
    if reasons:
        line += f" (skipped {len(other) + len(hidden)}: {'; '.join(reasons)})"
    return line


def make_tokenizer(cfg: TrainConfig) -> Tokenizer:
    """The tokenizer a new run trains (char, bpe: on ``cfg.data``) or reads (a file or
    folder); ``lmlab compare`` makes its shared tokenizer with it too."""
    if cfg.tokenizer in ("char", "bpe"):  # trained on the corpus, streamed (never whole in memory)
        files = resolve_data(cfg.data)
        chunks = iter_corpus(files, cfg.encoding_errors, builtin=cfg.data == "builtin")
        return train_tokenizer(cfg.tokenizer, chunks, cfg.vocab_size)
    return load_tokenizer(cfg.tokenizer)


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """trainer_state.json, each field the resumed run relies on checked for its type."""
    path = step_folder(folder) / "trainer_state.json"
    state = read_json(path, "trainer state")
    damaged = "the file is damaged (restore it, or start a new run from this checkpoint with --init)"
    for key, kinds in (("step", int), ("tokens", int), ("elapsed", (int, float)), ("best_val", (int, float))):
        value = state.get(key, 0)
        if key == "best_val" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value < 0:
            raise LmlabError(f"{path}: {key} must be a non-negative number, not {value!r}; {damaged}")
    for key in ("max_steps", "lr_end"):
        value = state.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise LmlabError(f"{path}: {key} must be a number, not {value!r}; {damaged}")
    return state


def check_step_memory(micro_batch: int, seq_len: int, vocab_size: int) -> None:
    """A micro-batch's logits (B·T·V floats, with their gradient and softmax: ~3 copies) must
    fit in memory: a --batch-size of a billion would otherwise fail deep in torch's
    allocator, or swap the machine, after the whole set-up."""
    from lmlab.runtime import machine_memory

    need = 3 * 4 * micro_batch * seq_len * vocab_size
    have = machine_memory()
    if have is not None and need > have:
        raise LmlabError(
            f"a micro-batch of {micro_batch:,} sequences × {seq_len:,} tokens needs about {need / 2**30:,.0f} GiB "
            f"for its logits alone, more than this machine's {have / 2**30:,.0f} GiB; lower --batch-size "
            "(or split it with --grad-accum)"
        )
