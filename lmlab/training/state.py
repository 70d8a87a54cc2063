"""What a checkpoint keeps beside the weights so that ``--resume`` continues the run
exactly: the optimizer's moments by parameter name and every rank's RNG state
(``training_state.safetensors``: safetensors, no pickle), the options it ran with
(``trainer_state.json``'s ``train_config``), and ``metrics.jsonl`` cut back to its step.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lmlab.checkpoint import unwrap
from lmlab.errors import LmlabError
from lmlab.training.config import TrainConfig


def param_names(model: torch.nn.Module) -> dict[int, str]:
    """id(parameter) -> its name, the key it is stored under (the same with and without DDP)."""
    return {id(p): n for n, p in unwrap(model).named_parameters()}


def state_tensors(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank_rngs: list[torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Optimizer moments by parameter name, and the RNG state: safetensors, no pickle.
    Under torchrun, ranks r > 0 store theirs as ``rng.torch_cpu.rank{r}``."""
    names = param_names(model)
    out: dict[str, torch.Tensor] = {"rng.torch_cpu": torch.get_rng_state()}
    for r, rng in enumerate(rank_rngs or []):
        if r > 0:
            out[f"rng.torch_cpu.rank{r}"] = rng
    for group in optimizer.param_groups:
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                out[f"optim.{names[id(p)]}.{k}"] = v.detach().to("cpu").contiguous().reshape(v.shape)
    return out


def load_training_state(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    rank: int,
    seed: int,
    step: int,
) -> dict[str, torch.Tensor]:
    """Restore what ``state_tensors`` stored in ``folder``: the optimizer's moments (onto
    ``device``) and this rank's RNG state (a fresh stream from (seed, rank, step) for a
    rank the stored run did not have). Returns every stored tensor (--ema-decay's raw
    weights are read from them)."""
    path = folder / "training_state.safetensors"
    if not path.is_file():
        raise LmlabError(
            f"{folder} has no training_state.safetensors; it cannot be resumed "
            "(start a new run from its weights instead)"
        )
    try:
        t = load_file(str(path))
    except Exception as e:
        raise LmlabError(f"{path} is damaged ({e}); resume from another checkpoint") from None
    names = param_names(model)
    sd = optimizer.state_dict()
    idx = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = {}
            for k in ("step", "exp_avg", "exp_avg_sq"):
                key = f"optim.{names[id(p)]}.{k}"
                if key in t:
                    st[k] = t[key].to(device) if k != "step" else t[key]
            if st:
                sd["state"][idx] = st
            idx += 1
    optimizer.load_state_dict(sd)
    # Each rank its own RNG stream: the one it saved when the run had as many ranks
    # (bit-identical resume), else a fresh one drawn from (seed, step, rank).
    key = "rng.torch_cpu" if rank == 0 else f"rng.torch_cpu.rank{rank}"
    if key in t:
        torch.set_rng_state(t[key])
    elif rank > 0:
        torch.manual_seed(rank_seed(seed, rank, step))
    return t


def stored_config(cfg: TrainConfig) -> dict[str, Any]:
    """The options ``trainer_state.json`` keeps for ``--resume``; not those that only say
    how this session started (which run to resume, --overwrite, the progress bar)."""
    d = dataclasses.asdict(cfg)
    for k in ("resume", "overwrite", "progress"):
        d.pop(k, None)
    return d


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A seed for rank r's own RNG stream (dropout), distinct per (seed, rank, step)."""
    return (seed * 0x9E3779B1 + rank * 0x632BE5AB + step * 0x85EBCA77) % (1 << 62)


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint (a killed run wrote them)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    path.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
