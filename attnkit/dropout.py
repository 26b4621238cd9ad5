"""Attention dropout for one call: the probability and the seed that decides its keep mask.

The mask itself is attnkit.reference.dropout's pure function of (seed, sequence,
head, row, key): every backend draws the same one, and the backward
regenerates it. Each call takes a fresh 62-bit seed from a generator, so
torch.manual_seed (or np.random.seed for NumPy inputs) makes a run repeat bit
for bit, as torch's own dropout does.
"""

from __future__ import annotations

import numbers
import sys
from typing import NamedTuple

import numpy as np

from .reference.dropout import keep_mask

_SEED_RANGE = 1 << 62


class Dropout(NamedTuple):
    """Dropout of one call: weights dropped with probability p, by the keep mask of seed."""

    p: float
    seed: int

    def keep(self, spec):
        """The keep mask of a dense call, spec.scores_shape (..., Hq, Nq, Nk) bool (the reference's input)."""
        sequences = int(np.prod(spec.batch, dtype=np.int64))
        return keep_mask(self.seed, self.p, sequences, spec.hq, spec.nq, spec.nk).reshape(spec.scores_shape)

    def keep_drawn_by_kernels(self, spec):
        """keep(spec) drawn by the CPU kernels' compiled Philox, a (sequence, head) at a time: the
        same bits (tests/test_dropout.py checks them against reference.dropout), ~20x faster than
        NumPy's 64-bit arithmetic (a mask's gradient needs the whole mask; B2 H8 N512, 4M weights:
        1.6 ms against 35 ms). keep(spec) where the kernels cannot load."""
        try:
            from .kernels.cpu.dropout import _dropout_factors, dropout_parameters
        except Exception:  # noqa: BLE001: Numba missing or failing: NumPy's draws are the same
            return self.keep(spec)
        sequences = int(np.prod(spec.batch, dtype=np.int64))
        params = dropout_parameters(self.seed, self.p)
        factors = np.empty((spec.nq, spec.nk), np.float32)  # 1 where kept, 0 where dropped
        words = np.empty(32 * (spec.nk // 64 + 2), np.uint32)  # a row's Philox words, whole vector steps
        keep = np.empty((sequences, spec.hq, spec.nq, spec.nk), np.bool_)
        for s in range(sequences):
            for h in range(spec.hq):
                _dropout_factors(factors, words, params, np.float32(1), np.float32(0), 0, 0, h, s)
                np.greater(factors, 0.5, out=keep[s, h])
        return keep.reshape(spec.scores_shape)


def _is_torch_generator(x):
    torch = sys.modules.get("torch")  # a torch.Generator exists only once torch is imported
    return torch is not None and isinstance(x, torch.Generator)


def draw_dropout(dropout_p, dropout_seed, kind):
    """A Dropout for this call, or None when dropout_p is 0.

    dropout_seed: None (draw from torch's default generator for tensors, NumPy's
    global one for arrays), an int in [0, 2**63), a torch.Generator or a
    numpy.random.Generator (drawn from); seeds are in [0, 2**63).
    """
    if dropout_p == 0:
        return None
    if dropout_seed is None:
        if kind == "torch":
            import torch

            seed = int(torch.randint(0, _SEED_RANGE, (), dtype=torch.int64))
        else:
            seed = int(np.random.randint(0, _SEED_RANGE, dtype=np.int64))
    elif isinstance(dropout_seed, np.random.Generator):
        seed = int(dropout_seed.integers(0, _SEED_RANGE))
    elif isinstance(dropout_seed, numbers.Integral) and not isinstance(dropout_seed, bool):
        seed = int(dropout_seed)
        if not 0 <= seed < 1 << 63:  # an int64 for the torch operators
            raise ValueError(f"dropout_seed must be in [0, 2**63); got {seed}")
    elif _is_torch_generator(dropout_seed):
        import torch

        seed = int(torch.randint(0, _SEED_RANGE, (), dtype=torch.int64, generator=dropout_seed,
                                 device=dropout_seed.device))  # fmt: skip
    else:
        raise TypeError(
            "dropout_seed must be None, an int, a torch.Generator or a numpy.random.Generator; "
            f"got {type(dropout_seed).__name__}"
        )
    return Dropout(float(dropout_p), seed)


def seed_tensor(dropout_p, dropout_seed):
    """The seed of a call torch.compile traces, as a 0-d int64 tensor of the graph: drawn from
    torch's default generator (or a given torch.Generator) on every call, where an int drawn at
    trace time would be a constant of the graph (the same mask every step); a given int, or a
    NumPy generator's draw, as a constant."""
    import torch

    if dropout_seed is None or _is_torch_generator(dropout_seed):
        return torch.randint(0, _SEED_RANGE, (), dtype=torch.int64, generator=dropout_seed)
    return torch.tensor(draw_dropout(dropout_p, dropout_seed, "torch").seed, dtype=torch.int64)
