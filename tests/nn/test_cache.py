"""The KV cache behind its methods, against a reference built by hand: a Python list of
every layer's keys and values in the order they were given, concatenated along time."""

from __future__ import annotations

import torch

from lmlab.nn.attention import causal_padding_mask
from lmlab.nn.cache import KVCache

L, B, H, S, D = 2, 3, 2, 10, 4  # layers, rows, kv heads, slots, head dim


def chunk(T: int, seed: int) -> torch.Tensor:
    return torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(seed))


def test_update_returns_everything_written_so_far_and_advance_moves_on() -> None:
    cache = KVCache(L, B, H, S, D)
    written: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {0: [], 1: []}
    assert (cache.length, cache.remaining) == (0, S)
    for step, T in enumerate([4, 1, 3]):
        for layer in range(L):
            k, v = chunk(T, 10 * step + layer), chunk(T, 100 + 10 * step + layer)
            written[layer].append((k, v))
            k_all, v_all = cache.update(layer, k, v)
            # the reference: this layer's chunks, in order, along time (dim 2)
            torch.testing.assert_close(
                k_all, torch.cat([kv[0] for kv in written[layer]], dim=2), atol=0, rtol=0
            )
            torch.testing.assert_close(
                v_all, torch.cat([kv[1] for kv in written[layer]], dim=2), atol=0, rtol=0
            )
        cache.advance(T)
    assert (cache.length, cache.remaining) == (8, S - 8)
    assert cache.shape == (L, B, H, S, D) and (cache.batch_size, cache.max_len) == (B, S)


def test_select_keeps_repeats_and_reorders_rows() -> None:
    cache = KVCache(L, B, H, S, D)
    k, v = chunk(5, 1), chunk(5, 2)
    cache.update(0, k, v)
    cache.mark(torch.tensor([[0, 1, 1, 1, 1], [1] * 5, [0, 0, 1, 1, 1]]), 5)
    cache.advance(5)
    index = torch.tensor([2, 2, 0, 1])
    assert cache.select(index) is cache
    assert cache.batch_size == 4 and cache.length == 5
    k_all, v_all = cache.update(0, chunk(1, 3)[:1].expand(4, H, 1, D), chunk(1, 4)[:1].expand(4, H, 1, D))
    torch.testing.assert_close(k_all[:, :, :5], k[index], atol=0, rtol=0)  # rows of the reference
    torch.testing.assert_close(v_all[:, :, :5], v[index], atol=0, rtol=0)
    want = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [1] * 5], dtype=torch.bool)
    assert torch.equal(cache.key_mask(5), want)


def test_select_copies_the_filled_slots_with_autograd_on_too() -> None:
    """Keys written by a forward with autograd on (a user's own loop) select as plain
    index_select does, and the gradient flows through the selected rows."""
    cache = KVCache(L, B, H, S, D)
    k = chunk(3, 5).requires_grad_()
    cache.update(0, k, chunk(3, 6))
    cache.advance(3)
    cache.select(torch.tensor([1, 1, 0]))
    k_all, _ = cache.update(0, chunk(1, 7), chunk(1, 8))
    torch.testing.assert_close(k_all[:, :, :3], k[[1, 1, 0]], atol=0, rtol=0)
    k_all[:, :, :3].sum().backward()
    ones = torch.ones(H, 3, D)  # row 1 was taken twice, row 0 once, row 2 not at all
    assert torch.equal(k.grad[0], ones) and torch.equal(k.grad[1], 2 * ones) and not k.grad[2].any()


def test_padding_bookkeeping_and_the_mask() -> None:
    """M[b, i, j] = (j ≤ start+i) ∧ (key j real ∨ j = start+i), written out by loops."""
    cache = KVCache(1, 2, 1, 8, 2)
    assert causal_padding_mask(3, None, cache, torch.device("cpu")) is None  # causal: no mask needed
    valid = torch.tensor([[0, 0, 1], [1, 1, 1]])
    cache.mark(valid, 3)
    assert cache.has_padding
    m = causal_padding_mask(3, valid, cache, torch.device("cpu"))
    cache.advance(3)
    cache.mark(None, 2)  # two real tokens after the prompt
    m2 = causal_padding_mask(2, None, cache, torch.device("cpu"))
    real = [[False, False, True, True, True], [True] * 5]
    for got, start, T in ((m, 0, 3), (m2, 3, 2)):
        assert got.shape == (2, 1, T, start + T)
        for b in range(2):
            for i in range(T):
                for j in range(start + T):
                    want = j <= start + i and (real[b][j] or j == start + i)
                    assert bool(got[b, 0, i, j]) == want, (b, i, j)


def test_the_cache_follows_the_state_protocol() -> None:
    from lmlab.models.base import State

    assert isinstance(KVCache(L, B, H, S, D), State)
