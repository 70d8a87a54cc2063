"""Continuous batching: many requests share each forward pass, joining and leaving between steps.

One thread owns the model and repeats

    choose   each running row picks its next token from its logits, with its own options
             (penalties, temperature, top-p, ..., its own seeded generator)
    leave    rows that ended (EOS, a stop string, max_tokens, a client that went away) drop
             out of the batch: their cache rows are removed (``state.select``)
    step     one forward pass over the tokens just chosen: (B, 1) ids -> (B, V) logits
    join     waiting requests are prefilled (their prompts, left-padded together) and their
             cache rows appended to the running batch (``KVCache.join``)

so a short request that arrives while a long one is generating starts at the next step and
leaves when it is done, instead of waiting for the long one (Orca, Yu et al. 2022; vLLM).

Why each row gets what it would get alone: a row's keys keep their order in the joined
cache (right-aligned, the gap in front masked), its positions are passed explicitly, and its
sampling runs on its own generator seeded as ``Model.generate`` seeds it — so greedy output
and seeded samples equal those of the same request served alone.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import torch
from torch import Tensor

from lmlab.errors import LmlabError
from lmlab.generate.logits import Penalties, process_logits
from lmlab.generate.runner import Runner
from lmlab.generate.sampling import Choice, argmax_only, logprob_info, resolve_seed
from lmlab.generate.speculative import check_speculative, speculative_sample
from lmlab.generate.text import TextStream, bad_words_to_ids
from lmlab.models.rnn import RecurrentState
from lmlab.nn import fastpath, screen
from lmlab.nn.cache import KVCache
from lmlab.serve.jobs import Job, QueueFull, Row, TokenEvent

log = logging.getLogger("lmlab.serve")


class Engine:
    """The batching loop over one decoder-only model (a Transformer or an RNN) of ``model``
    (an :class:`lmlab.api.Model`). ``submit`` a :class:`Job`; events arrive on its sink."""

    def __init__(
        self, model: object, max_batch: int = 32, max_queue: int = 256, thread: bool = True,
        draft: object | None = None, num_assistant_tokens: int = 5,
    ) -> None:  # fmt: skip
        """``draft`` (a smaller decoder-only module with the same tokenizer): every request it can
        serve (one sequence, no penalties: :func:`check_speculative`) is decoded speculatively,
        ``num_assistant_tokens`` guesses a pass, beside the batch; the others join the batch."""
        self.model = model
        self.draft, self.num_assistant_tokens = draft, num_assistant_tokens
        self.module = model.module  # type: ignore[attr-defined]
        self.tokenizer = model.tokenizer  # type: ignore[attr-defined]
        self.max_batch, self.max_queue = max_batch, max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._rows: list[Row] = []
        # requests decoded speculatively (prompt_lookup_num_tokens): one pass each per turn, beside the batch
        self._solo: list[tuple[Row, Iterator[list[Choice]]]] = []
        self._state: KVCache | RecurrentState | None = None
        self._pos: Tensor | None = None  # (B,) each row's next position (Transformers)
        self._logits: Tensor | None = None  # (B, V) the next-token scores of each running row
        self._calls: collections.deque[tuple[Callable[[], object], Future]] = collections.deque()
        # the decoding loop's fast paths (lmlab.generate.runner): oneDNN products, and for the
        # batch's one-token steps the unrolled step and the screened output layer (_fast_paths)
        self._fast = bool(fastpath.prepare(self.module)) or fastpath.quantized(self.module)
        self._screen: tuple[int, Tensor | None, bool] | None = None  # screen.prepare's (and its bf16), once wanted
        self._closed = False
        self._logged, self._logged_at = (0, 0), 0.0
        self.stats = {"steps": 0, "running": 0, "waiting": 0, "max_running": 0, "tokens": 0, "requests": 0,
                      "drafted": 0}  # requests the draft model (--draft) decoded speculatively
        # thread=False: the caller runs the loop (serve_forever) on its own thread. lmlab serve runs
        # it on the main thread: on this project's machines a model's small products ran 25-40%
        # slower from any other thread (OpenMP/MKL; greedy GPT-2: 35 vs 47 tokens/s).
        self._thread = threading.Thread(target=self._run, name="lmlab-engine", daemon=True) if thread else None
        if self._thread is not None:
            self._thread.start()

    def serve_forever(self) -> None:
        """Run the loop on this thread until :meth:`close` (an Engine made with ``thread=False``)."""
        self._run()

    # ------------------------------------------------------------------ requests
    def submit(self, job: Job) -> None:
        ctx = self.module.config.max_seq_len if self.module.bounded_context else None
        if ctx is not None and len(job.prompt_ids) + job.cfg.max_new_tokens > ctx:
            P = len(job.prompt_ids)
            fix = (f"ask for at most {ctx - P} tokens" if P < ctx
                   else "shorten the prompt (it leaves no room for a new token)")  # fmt: skip
            raise LmlabError(
                f"the prompt ({P} tokens) + max_tokens ({job.cfg.max_new_tokens}) is more than "
                f"the model's context of {ctx} tokens; {fix}"
            )
        if job.n > self.max_batch:
            raise LmlabError(f"n={job.n} is more than this server's --max-batch {self.max_batch}")
        if job.cfg.prompt_lookup_num_tokens is not None:
            check_speculative(self.module, job.cfg, job.n, None)
        with self._cond:
            if len(self._waiting) >= self.max_queue:  # requests whose clients left do not count
                self._waiting = collections.deque(j for j in self._waiting if not j.cancelled)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue}); retry later")
            self._waiting.append(job)
            self.stats["waiting"] = len(self._waiting)
            self._cond.notify()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run ``fn`` on the engine's thread between two steps (the model is used by one thread)."""
        future: Future = Future()
        with self._cond:
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._rows and not self._solo and not self._waiting and not self._calls:
                    self._cond.wait()
                if self._closed:
                    return
            self.step()

    def step(self) -> None:
        """One turn of the loop: the calls waiting for the engine's thread, then choose -> leave ->
        step -> join (see the module's docstring). The loop repeats it; with ``thread=False`` a
        caller may turn it by hand (the tests count steps so)."""
        with self._cond:
            calls, self._calls = list(self._calls), collections.deque()
        for fn, future in calls:
            try:
                future.set_result(fn())
            except Exception as e:  # handed to the caller
                future.set_exception(e)
        try:
            with torch.inference_mode():
                self._iteration()
        except Exception as e:  # a bug or an out-of-memory: fail the running requests, keep serving
            log.exception("the batch failed; its requests get an error")
            for job in {id(r.job): r.job for r in self._rows}.values():
                job.sink(e)
            self._rows, self._state, self._pos, self._logits = [], None, None, None

    def _iteration(self) -> None:
        """choose -> leave -> step -> join (see the module's docstring)."""
        self._logits = None if not self._rows else self._advance(self._choose())
        self._join()
        self._advance_solo()
        self.stats["running"] = len(self._rows) + len(self._solo)
        self.stats["max_running"] = max(self.stats["max_running"], len(self._rows))
        self._log_batch()

    def _log_batch(self) -> None:
        """The running batch size, when it changed (at most once a second): what batching does."""
        now = time.monotonic()
        key = (self.stats["running"], self.stats["waiting"])
        if key != self._logged and now - self._logged_at >= 1.0:
            log.info("batch: %d running, %d waiting, %d tokens so far", *key, self.stats["tokens"])
            self._logged, self._logged_at = key, now

    def _advance(self, tokens: list[int]) -> Tensor | None:
        keep = [i for i, r in enumerate(self._rows) if not (r.done or r.job.cancelled)]
        if not keep:
            self._rows, self._state, self._pos = [], None, None
            return None
        if len(keep) < len(self._rows):
            self._select(keep)
        return self._step([tokens[i] for i in keep])

    def _choose(self) -> list[int]:
        """Each row's next token from its logits, with its own options (as ``sample`` does)."""
        assert self._logits is not None
        chosen = []
        for i, row in enumerate(self._rows):
            if row.job.cancelled:
                chosen.append(0)
                continue
            try:
                chosen.append(self._choose_one(i, row))
            except Exception as e:  # one request's options broke its row: it alone gets the error
                log.exception("a request failed while choosing its token")
                row.done = True
                row.job.cancel()
                row.job.sink(e)
                chosen.append(0)
        self.stats["steps"] += 1
        return chosen

    def _choose_one(self, i: int, row: Row) -> int:
        """Row i's next token from its logits, with its own options (as ``sample`` does)."""
        cfg = row.job.cfg
        z = self._logits[i : i + 1]
        if row.penalties.active:
            z = row.penalties(z, [row.seq], [row.prompt_len], row.generated)
        if cfg.greedy:
            dist = _finite(z)
            t = int(dist.argmax(dim=-1))
        else:
            dist = _finite(process_logits(z, cfg))
            t = int(torch.multinomial(dist.softmax(dim=-1), 1, generator=row.gen)[0, 0])
        lp = top = None
        if cfg.logprobs is not None:
            lps, tops = logprob_info(torch.log_softmax(dist, dim=-1), torch.tensor([t]), cfg.logprobs)
            lp, top = lps[0], tops[0]
        self._emit(row, t, lp, top)
        return t

    def _emit(self, row: Row, t: int, lp: float | None, top: list[tuple[int, float]] | None) -> None:
        cfg = row.job.cfg
        row.seq.append(t)
        row.ids.append(t)
        row.generated += 1
        self.stats["tokens"] += 1
        hit_stop = row.stream.push(t)  # (an EOS adds no text: decoding skips special tokens)
        finish = None
        if t in cfg.eos_token_id or hit_stop:
            finish = "stop"
        elif row.generated >= cfg.max_new_tokens:
            finish = "length"
        if finish is None:
            row.job.sink(TokenEvent(row.index, t, row.stream.delta(), lp, top))
            return
        row.done = True  # it leaves the batch before the next step
        row.job.finished += 1
        row.job.sink(TokenEvent(row.index, t, row.stream.finish(), lp, top, finish, row.stream.text, row.ids))

    # ------------------------------------------------------------------ speculative requests
    def _advance_solo(self) -> None:
        """One verification pass of each speculative request: its accepted guesses and one more
        token go out together. Such a request runs beside the batch (batch 1: its guesses are its
        own), its output what ``Model.generate`` gives with the same option."""
        still = []
        for row, steps in self._solo:
            if row.job.cancelled:
                steps.close()
                continue
            try:
                for c in next(steps):
                    self._emit(row, c.token, c.logprob, c.top)
                    if row.done:
                        break
            except StopIteration:
                row.done = True
            except Exception as e:  # this request alone fails
                log.exception("a speculative request failed")
                row.done = True
                row.job.sink(e)
            if row.done:
                steps.close()
            else:
                still.append((row, steps))
        self._solo = still

    def _drafted(self, job: Job) -> bool:
        """Whether ``job`` goes to the draft model (--draft): one it can decode exactly."""
        if self.draft is None or job.cfg.prompt_lookup_num_tokens is not None:
            return False
        ctx = min(self.module.config.max_seq_len, self.draft.config.max_seq_len)
        if len(job.prompt_ids) + job.cfg.max_new_tokens > ctx:
            return False  # past the draft's context: the batch (a sliding window there)
        try:
            check_speculative(self.module, job.cfg, job.n, self.draft)
        except LmlabError:
            return False
        return True

    def _start_solo(self, job: Job, draft: bool = False) -> None:
        row = self._new_row(job, 0)
        seed = None if row.gen is None else int(row.gen.initial_seed())
        cfg = dataclasses.replace(job.cfg, num_assistant_tokens=self.num_assistant_tokens) if draft else job.cfg
        steps = speculative_sample(self.module, [job.prompt_ids], cfg, [seed],  # stop strings: _emit's
                                   draft=self.draft if draft else None)  # fmt: skip
        self._solo.append((row, steps))

    # ------------------------------------------------------------------ the batch
    def _select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self.module.device)
        self._rows = [self._rows[i] for i in keep]
        self._state = self._state.select(index)
        if isinstance(self._state, KVCache):
            self._state.trim()
        if self._pos is not None:
            self._pos = self._pos.index_select(0, index)

    def _step(self, tokens: list[int]) -> Tensor:
        ids = torch.tensor(tokens, device=self.module.device)[:, None]
        with self._fast_paths():
            if isinstance(self._state, KVCache):
                if self._state.remaining < 1:  # pragma: no cover - join reserves every row's room
                    self._state = KVCache.join([self._state], self._room())
                logits, self._state = self.module(ids, self._state, position_ids=self._pos[:, None], last_only=True)
                self._pos = self._pos + 1
            else:
                logits, self._state = self.module(ids, self._state, last_only=True)
        return logits[:, -1].float()

    @contextlib.contextmanager
    def _fast_paths(self) -> Iterator[None]:
        """What the decoding loop's Runner turns on, for this step of the batch: the unrolled
        one-token step while nothing observes the model (a hook added meanwhile is seen at the
        next step), and the screened output layer when every row's logits serve only an argmax
        (greedy, no log-probs, no penalty that rescales; :func:`argmax_only`) — exact, so each
        row's tokens are still those ``Model.generate`` gives. ``fast_decoding`` and
        ``screen_output`` are read at every step."""
        with contextlib.ExitStack() as stack:
            if self._fast and getattr(self.module, "fast_decoding", True):
                stack.enter_context(fastpath.unrolling(fastpath.unobserved(self.module)))
                keep = self._screen_keep()
                if keep is not None:
                    stack.enter_context(screen.screening(keep, self._screen[1]))
            yield

    def _screen_keep(self) -> Tensor | None:
        """The tokens a mask may remove, over every row, if every row needs only its argmax."""
        asked = getattr(self.module, "screen_output", None)
        if asked is not None and not asked:
            if self._screen is not None:  # turned off: its copy goes
                screen.prepare(self.module, on=False)
                self._screen = None
            return None
        keep: set[int] = set()
        for row in self._rows:
            k = argmax_only(row.job.cfg, row.penalties)
            if k is None:
                return None
            keep.update(k)
        if self._screen is None or self._screen[2] != bool(asked):
            self._screen = (*screen.prepare(self.module, bf16=bool(asked)), bool(asked))
        return screen.keep_tensor(keep) if self._screen[0] else None

    def _room(self) -> int:
        """Slots every running row may still need: one per token it may still feed back."""
        return max((r.job.cfg.max_new_tokens - r.generated for r in self._rows), default=1)

    def _join(self) -> None:
        """Prefill the waiting requests that fit and append their rows to the batch."""
        jobs: list[Job] = []
        with self._cond:
            free = self.max_batch - len(self._rows) - len(self._solo)
            while self._waiting and self._waiting[0].n <= free:
                job = self._waiting.popleft()
                if job.cancelled:
                    continue
                if job.cfg.prompt_lookup_num_tokens is not None:
                    self._start_solo(job)
                elif self._drafted(job):
                    self._start_solo(job, draft=True)
                    self.stats["drafted"] += 1
                else:
                    jobs.append(job)
                free -= job.n
            self.stats["waiting"] = len(self._waiting)
        if not jobs:
            return
        self.stats["requests"] += len(jobs)
        try:
            runner, logits, new_rows = self._prefill(jobs)
        except Exception as e:  # these requests alone fail (too big a cache, a bad token id): the batch goes on
            log.exception("prefilling %d request(s) failed", len(jobs))
            for job in jobs:
                job.sink(e)
            return
        old_state, old_logits = self._state, self._logits
        self._rows = self._rows + new_rows
        if isinstance(runner.state, KVCache):
            caches = [old_state, runner.state] if old_state is not None else [runner.state]
            self._state = KVCache.join(caches, self._room())
            pos = runner.next_pos.to(torch.long)
            self._pos = pos if self._pos is None else torch.cat([self._pos, pos])
        else:
            self._state = runner.state if old_state is None else RecurrentState.cat([old_state, runner.state])
        self._logits = logits if old_logits is None else torch.cat([old_logits, logits])

    def _prefill(self, jobs: list[Job]) -> tuple[Runner, Tensor, list[Row]]:
        """The waiting prompts, left-padded together: their state, first logits and rows (n per job)."""
        # max_new_tokens=1: the cache need hold only the prompts (join reserves each row's own room),
        # and no sliding-window warning for a prompt that fits with its own max_tokens
        runner = Runner(self.module, 1)
        logits = runner.prefill([j.prompt_ids for j in jobs])  # (J, V): one row per prompt
        if any(j.n > 1 for j in jobs):
            repeat = torch.tensor([k for k, j in enumerate(jobs) for _ in range(j.n)], device=logits.device)
            runner.select(repeat)
            logits = logits.index_select(0, repeat)
        return runner, logits, [self._new_row(j, c) for j in jobs for c in range(j.n)]

    def _new_row(self, job: Job, index: int) -> Row:
        cfg = job.cfg
        gen = None
        if not cfg.greedy:
            base = cfg.seed if cfg.seed is not None else resolve_seed(cfg)
            gen = torch.Generator(device=self.module.device)
            gen.manual_seed(int(base) + index)  # the copies of one prompt differ, as in Model.generate
        penalties = Penalties(cfg, bad_words_to_ids(self.tokenizer, cfg.bad_words))
        return Row(job, index, list(job.prompt_ids), TextStream(self.tokenizer, cfg.stop), penalties, gen,
                    prompt_len=len(job.prompt_ids))  # fmt: skip


def _finite(z: Tensor) -> Tensor:
    """Scores that extreme options pushed out of range (a repetition penalty of 1e-300 divides
    by it): +inf becomes the largest float (those tokens tie for first), NaN is excluded (-inf);
    if nothing is left, every token is equally likely. A request never crashes its row."""
    if bool(torch.isfinite(z).all()):
        return z
    z = torch.nan_to_num(z, nan=float("-inf"), posinf=torch.finfo(z.dtype).max, neginf=float("-inf"))
    return torch.where(torch.isinf(z).all(dim=-1, keepdim=True), torch.zeros_like(z), z)


__all__ = ["Engine", "Job", "QueueFull", "TokenEvent"]
