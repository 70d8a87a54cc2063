"""Chunked prefill: a prompt longer than PREFILL_CHUNK goes through the KV cache a chunk at a
time, and gives the next-token logits the whole prompt gives in one uncached forward."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

from lmlab.generate import runner as R


def _spy(model: torch.nn.Module) -> list[int]:
    """The number of new tokens of every forward the model runs."""
    widths: list[int] = []
    model.register_forward_pre_hook(lambda m, args: widths.append(args[0].shape[1]))
    return widths


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_a_long_prompt_is_prefilled_in_chunks_with_the_same_logits(pos: str) -> None:
    model = tiny_model(50, pos=pos, max_seq_len=1024)
    prompt = torch.randint(0, 50, (700,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        want = model(torch.tensor([prompt]))[0][:, -1]  # the reference: one uncached pass
        widths = _spy(model)
        runner = R.Runner(model, 4)
        got = runner.prefill([prompt])
    assert widths == [R.PREFILL_CHUNK, 700 - R.PREFILL_CHUNK]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_left_padded_prompts_are_prefilled_in_chunks_each_as_alone() -> None:
    model = tiny_model(50, pos="rope", max_seq_len=2048)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50, (n,), generator=g).tolist() for n in (1100, 300, 600)]
    with torch.no_grad():
        want = torch.cat([model(torch.tensor([p]))[0][:, -1] for p in prompts])
        widths = _spy(model)
        runner = R.Runner(model, 4)
        got = runner.prefill(prompts)
        nxt = runner.step(got.argmax(-1), [p + [int(t)] for p, t in zip(prompts, got.argmax(-1))])
        ref = torch.cat([model(torch.tensor([p + [int(t)]]))[0][:, -1] for p, t in zip(prompts, got.argmax(-1))])
    assert widths[:4] == [512, 512, 76, 1]  # three chunks of the padded batch, then a step
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nxt, ref, atol=1e-5, rtol=1e-5)  # the cache holds the whole prompts


def test_a_short_prompt_is_one_pass() -> None:
    model = tiny_model(50, max_seq_len=1024)
    widths = _spy(model)
    with torch.no_grad():
        R.Runner(model, 4).prefill([[1, 2, 3] * 170])  # 510 tokens
    assert widths == [510]
