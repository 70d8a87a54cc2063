"""The key/value cache: what attention remembers of the positions already seen.

The cache hides its storage (as gpt-fast's and Hugging Face's do): attention hands it the
new keys and values of one layer and gets back everything to attend over,

    k_all, v_all = cache.update(layer, k, v)      # write at the current position, read [0, pos+T)
    cache.advance(T)                               # once every layer has written its T slots

and the decoding loop sees only the state protocol (:class:`lmlab.models.base.State`):
``select(index)`` to keep, repeat or reorder batch rows, ``remaining`` free slots. Nothing
in it is specific to self-attention: a cross-attention cache (an encoder-decoder's keys and
values of the source) uses the same methods.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmlab.errors import LmlabError
from lmlab.runtime import machine_memory


class KVCache:
    """Keys and values of every layer for every position seen so far.

    Preallocated once at its full size, (n_layer, B, n_kv_head, max_len, head_dim),
    so that decoding allocates nothing per token: step t writes slot t and attends
    over slots [0, t]. A validity mask per slot marks real tokens (False for left padding).

    ``max_len`` is what the request needs, not the model's context: the decoding loop asks
    for P + max_new_tokens - 1 slots (the last new token is never fed back), at most
    ``max_seq_len``; 2·n_layer·B·n_kv_head·max_len·head_dim numbers in all, so a 20-token
    prompt on a 32k-context model costs 19 + max_new_tokens slots, not 32k.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        check_cache_fits(shape, dtype, device)
        self._k = torch.zeros(shape, device=device, dtype=dtype)
        self._v = torch.zeros(shape, device=device, dtype=dtype)
        self._valid = torch.ones(batch_size, max_len, device=device, dtype=torch.bool)
        self._has_padding = False
        self._length = 0  # slots filled

    # ------------------------------------------------------------------ size
    @property
    def shape(self) -> tuple[int, ...]:
        """(n_layer, B, n_kv_head, max_len, head_dim): the storage of keys (and of values)."""
        return tuple(self._k.shape)

    @property
    def batch_size(self) -> int:
        return self._k.shape[1]

    @property
    def max_len(self) -> int:
        return self._k.shape[3]

    @property
    def length(self) -> int:
        """Slots filled: the position of the next token."""
        return self._length

    @property
    def remaining(self) -> int:
        """Free slots: how many more tokens fit."""
        return self.max_len - self._length

    # ------------------------------------------------------------------ writing
    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``layer``'s new keys/values (B, n_kv_head, T, head_dim) at slots
        [length, length+T) and return the keys/values of slots [0, length+T) to attend over.

        Every layer writes the same slots; :meth:`advance` moves past them afterwards.
        """
        start, end = self._length, self._length + k.shape[-2]
        self._k[layer, :, :, start:end] = k
        self._v[layer, :, :, start:end] = v
        return self._k[layer, :, :, :end], self._v[layer, :, :, :end]  # (B, n_kv, S, hs)

    def advance(self, n: int) -> None:
        """The next ``n`` slots are filled (called once per forward, after every layer)."""
        self._length += n

    def rewind(self, n: int) -> None:
        """Forget the last ``n`` filled slots (speculative decoding: the guesses the model
        rejected); the next write overwrites them."""
        if not 0 <= n <= self._length:
            raise ValueError(f"cannot rewind {n} slots of {self._length}")
        self._length -= n

    # ------------------------------------------------------------------ padding
    def mark(self, valid: Tensor | None, n: int) -> None:
        """Record which of the next ``n`` slots hold real tokens: ``valid`` (B, n) bool, or
        None when all of them do. Call before :meth:`advance`."""
        start = self._length
        if valid is None:
            self._valid[:, start : start + n] = True
            return
        valid = valid.to(device=self._valid.device, dtype=torch.bool)
        self._valid[:, start : start + n] = valid
        self._has_padding = self._has_padding or not bool(valid.all())

    @property
    def has_padding(self) -> bool:
        """Whether any slot written so far is padding (then every query needs a mask)."""
        return self._has_padding

    def key_mask(self, n: int) -> Tensor:
        """(B, n) bool: True where slot j < n holds a real token."""
        return self._valid[:, :n]

    # ------------------------------------------------------------------ rows
    def select(self, index: Tensor) -> KVCache:
        """Keep batch rows ``index`` (may repeat or reorder: finished rows, beams); returns self."""
        index = index.to(self._k.device)
        self._k, self._v = self._rows(self._k, index), self._rows(self._v, index)
        self._valid = self._valid.index_select(0, index)
        return self

    def _rows(self, t: Tensor, index: Tensor) -> Tensor:
        """Rows ``index`` of keys or values, copying only the filled slots: the others are
        never read before a write (a beam search reorders its cache at every step, early on
        mostly empty: 3× less copying over a 64-token beam search)."""
        if t.requires_grad:  # (a loop of the user's with autograd on: out= has no gradient)
            return t.index_select(1, index)
        out = t.new_empty((t.shape[0], len(index), *t.shape[2:]))
        n = self._length
        torch.index_select(t[:, :, :, :n], 1, index, out=out[:, :, :, :n])
        return out

    # ------------------------------------------------------------------ continuous batching
    @staticmethod
    def join(caches: list[KVCache], extra: int) -> KVCache:
        """One cache holding the rows of ``caches`` (in order), with room for ``extra`` more slots.

        Rows that arrived at different times have filled different numbers of slots, so each
        cache's filled slots are right-aligned at the longest one's length L, the slots in front
        marked padding: a row's keys keep their order and their positions (positions are passed
        per row, not read from slots), and the mask hides the gap, so every row attends to exactly
        what it did before. Used by a server to let a request join a running batch.
        """
        first = caches[0]
        n_layer, _, n_kv, _, hd = first.shape
        L = max(c.length for c in caches)
        out = KVCache(n_layer, sum(c.batch_size for c in caches), n_kv, L + extra, hd,
                      device=first._k.device, dtype=first._k.dtype)  # fmt: skip
        out._valid[:, :L] = False
        row = 0
        for c in caches:
            b, off, n = c.batch_size, L - c.length, c.length
            out._k[:, row : row + b, :, off:L] = c._k[:, :, :, :n]
            out._v[:, row : row + b, :, off:L] = c._v[:, :, :, :n]
            out._valid[row : row + b, off:L] = c._valid[:, :n]
            row += b
        out._length = L
        out._has_padding = not bool(out._valid[:, :L].all())
        return out

    def trim(self) -> KVCache:
        """Drop the leading slots that are padding in every row (their rows have left the batch),
        so a long-running batch does not grow without bound; returns self."""
        real = self._valid[:, : self._length].any(dim=0)
        first = int(real.nonzero()[0, 0]) if bool(real.any()) else self._length
        if first == 0:
            return self
        self._k, self._v = self._k[:, :, :, first:].contiguous(), self._v[:, :, :, first:].contiguous()
        self._valid = self._valid[:, first:].contiguous()
        self._length -= first
        self._has_padding = not bool(self._valid[:, : self._length].all())
        return self


__all__ = ["KVCache"]


def check_cache_fits(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None = None) -> None:
    """Keys and values of 2·n_layer·B·n_kv·S·hd numbers: refuse, before allocating, a cache
    bigger than the machine's memory (10 million return sequences, say), which would
    otherwise swap for minutes or fail deep inside torch."""
    n_layer, batch, _, max_len, _ = shape
    need = 2 * math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    have = torch.cuda.mem_get_info(dev)[1] if dev.type == "cuda" else machine_memory()
    if have is not None and need > have:
        raise LmlabError(
            f"the key/value cache for {batch:,} sequences of {max_len:,} positions needs {need / 2**30:,.1f} GiB, "
            f"more than the {have / 2**30:,.1f} GiB of {dev.type} memory; generate fewer sequences at once "
            "(batch × num_return_sequences × num_beams) or fewer new tokens"
        )
