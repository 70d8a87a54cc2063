"""Recurrent cells written out, one equation per line, and the loop that stacks them.

lmlab's recurrent language models (:mod:`lmlab.models.rnn`) run PyTorch's fused
``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` over a window of tokens (oneDNN / cuDNN kernels, far
faster than a Python loop over time), and :func:`run_layers` for a single decoding step
on a CPU, with PyTorch's one-step kernels ``torch.rnn_tanh_cell`` / ``gru_cell`` /
``lstm_cell``. This module says what all of those compute; with ``explicit = True`` the
model runs these very equations, on the same weights. It keeps PyTorch's weight layout and
names (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``, gates
stacked in PyTorch's order), so :class:`RecurrentStack` loads a fused layer's
``state_dict()`` as it is, and the tests check both give the same numbers.

Notation: x the input at one time step (B, I), h the hidden state (B, H), c the LSTM
cell state (B, H), σ the logistic sigmoid, ⊙ the element-wise product. Every W_i·
is (H, I) and every W_h· is (H, H); PyTorch stacks them row-wise into one weight_ih
(G·H, I) and one weight_hh (G·H, H), G = 1 (RNN), 3 (GRU) or 4 (LSTM).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Gates per cell: the row blocks of weight_ih / weight_hh, in PyTorch's order.
GATES = {"rnn": 1, "gru": 3, "lstm": 4}

#: A cell's state: h for the RNN and GRU, (h, c) for the LSTM.
CellState = Tensor | tuple[Tensor, Tensor]


def rnn_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """The Elman RNN (Elman 1990), PyTorch's ``nn.RNN`` with tanh."""
    # h' = tanh(W_ih x + b_ih + W_hh h + b_hh)
    return torch.tanh(F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh))


def gru_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """The gated recurrent unit (Cho et al. 2014) in PyTorch's convention, where the
    reset gate scales W_hn h + b_hn (not h itself, as in the paper): the two differ,
    and only this form lets the hidden-side product be computed for all gates at once."""
    gi_r, gi_z, gi_n = F.linear(x, w_ih, b_ih).chunk(3, dim=-1)  # (B, 3H) -> 3 × (B, H)
    gh_r, gh_z, gh_n = F.linear(h, w_hh, b_hh).chunk(3, dim=-1)
    # r = σ(W_ir x + b_ir + W_hr h + b_hr)          reset gate: how much past enters the candidate
    r = torch.sigmoid(gi_r + gh_r)
    # z = σ(W_iz x + b_iz + W_hz h + b_hz)          update gate: how much of h is kept
    z = torch.sigmoid(gi_z + gh_z)
    # n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))  candidate state
    n = torch.tanh(gi_n + r * gh_n)
    # h' = (1 - z) ⊙ n + z ⊙ h
    return (1 - z) * n + z * h


def lstm_cell(
    x: Tensor, state: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor
) -> tuple[Tensor, Tensor]:
    """Long short-term memory (Hochreiter & Schmidhuber 1997, with the forget gate of
    Gers et al. 2000): the additive update of c lets gradients flow across many steps."""
    h, c = state
    gates = F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)  # (B, 4H), blocks i, f, g, o
    gi, gf, gg, go = gates.chunk(4, dim=-1)
    # i = σ(W_ii x + b_ii + W_hi h + b_hi)          input gate: how much of g is written
    i = torch.sigmoid(gi)
    # f = σ(W_if x + b_if + W_hf h + b_hf)          forget gate: how much of c is kept
    f = torch.sigmoid(gf)
    # g = tanh(W_ig x + b_ig + W_hg h + b_hg)       the candidate written to the cell
    g = torch.tanh(gg)
    # o = σ(W_io x + b_io + W_ho h + b_ho)          output gate: how much of the cell is shown
    o = torch.sigmoid(go)
    # c' = f ⊙ c + i ⊙ g
    c_next = f * c + i * g
    # h' = o ⊙ tanh(c')
    h_next = o * torch.tanh(c_next)
    return h_next, c_next


#: The equations above, by cell name: step(x, h or (h, c), w_ih, w_hh, b_ih, b_hh).
CELLS: dict[str, Callable[..., CellState]] = {"rnn": rnn_cell, "gru": gru_cell, "lstm": lstm_cell}

#: PyTorch's one-step kernels of the same equations, with the same signature.
KERNELS: dict[str, Callable[..., CellState]] = {
    "rnn": torch.rnn_tanh_cell,
    "gru": torch.gru_cell,
    "lstm": torch.lstm_cell,
}


def run_layers(
    cell: str,
    x: Tensor,
    weights: Sequence[Sequence[Tensor]],
    state: CellState | None = None,
    dropout: float = 0.0,
    training: bool = False,
    kernels: bool = False,
) -> tuple[Tensor, CellState]:
    """Run a stack of recurrent layers over a sequence, as ``nn.RNN/GRU/LSTM`` with
    ``batch_first=True`` do: the explicit equations, or (``kernels``) PyTorch's one-step
    kernels of them.

    x: (B, T, I). weights: one ``(w_ih, w_hh, b_ih, b_hh)`` per layer. state: h, or
    (h, c) for the LSTM, each (n_layer, B, H); None = zeros. Layer k+1 reads layer k's
    outputs h_1..h_T, with dropout between layers (not after the last), as PyTorch.
    Returns the last layer's outputs (B, T, H) and the final state of every layer.
    """
    if cell not in GATES:
        raise ValueError(f"cell must be one of {', '.join(GATES)} (got {cell!r})")
    B, T, _ = x.shape
    H = weights[0][1].shape[1]  # w_hh is (G·H, H)
    if state is None:
        zeros = x.new_zeros(len(weights), B, H)
        state = (zeros, zeros.clone()) if cell == "lstm" else zeros
    step = (KERNELS if kernels else CELLS)[cell]
    h_last, c_last = [], []
    for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(weights):
        if k > 0 and dropout > 0:
            x = F.dropout(x, dropout, training)
        h = state[0][k] if cell == "lstm" else state[k]  # (B, H)
        c = state[1][k] if cell == "lstm" else None
        outs = []
        for t in range(T):  # the recurrence: step t needs step t-1, so time is sequential
            if cell == "lstm":
                h, c = step(x[:, t], (h, c), w_ih, w_hh, b_ih, b_hh)
            else:
                h = step(x[:, t], h, w_ih, w_hh, b_ih, b_hh)
            outs.append(h)
        x = torch.stack(outs, dim=1)  # (B, T, H): the next layer's input
        h_last.append(h)
        c_last.append(c)
    h_n = torch.stack(h_last)  # (n_layer, B, H)
    return x, ((h_n, torch.stack(c_last)) if cell == "lstm" else h_n)


class RecurrentStack(nn.Module):
    """The reference twin of ``nn.RNN/GRU/LSTM(batch_first=True)``: the same parameter
    names, shapes and initialisation, computed by the explicit cells above. Slow (a
    Python loop over time); for reading and for checking the fused kernels."""

    def __init__(
        self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if cell not in GATES:
            raise ValueError(f"cell must be one of {', '.join(GATES)} (got {cell!r})")
        self.cell, self.hidden_size, self.num_layers, self.dropout = cell, hidden_size, num_layers, dropout
        G = GATES[cell]
        for k in range(num_layers):
            n_in = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(G * hidden_size, n_in)))
            self.register_parameter(
                f"weight_hh_l{k}", nn.Parameter(torch.empty(G * hidden_size, hidden_size))
            )
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(G * hidden_size)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(G * hidden_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's init for recurrent layers: every weight and bias ~ U(-1/√H, 1/√H)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def layer_weights(self) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        return [
            tuple(getattr(self, f"{kind}_l{k}") for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            for k in range(self.num_layers)
        ]

    def forward(self, x: Tensor, state: CellState | None = None) -> tuple[Tensor, CellState]:
        """x: (B, T, I) -> outputs (B, T, H) and the final state, as the fused layer."""
        return run_layers(self.cell, x, self.layer_weights(), state, self.dropout, self.training)


__all__ = ["CELLS", "GATES", "KERNELS", "RecurrentStack", "gru_cell", "lstm_cell", "rnn_cell", "run_layers"]
