"""Kernel test cases shared by the test modules (a helper module: tests never import each other).

Case describes one kernel call (shapes, features, dtype) with a readable pytest
id; make_mask builds the mask a case names.
"""

from __future__ import annotations

import math

import numpy as np


class Case:
    """One kernel call: shapes, features and dtype, with a readable pytest id."""

    def __init__(
        self, b=1, hq=2, hkv=None, nq=64, nk=None, d=32, dv=None, causal=None, window=None,
        softcap=None, mask=None, dtype=np.float32, scale=None, seed=0,
    ):  # fmt: skip
        self.b, self.hq, self.hkv = b, hq, hkv or hq
        self.nq, self.nk = nq, nk if nk is not None else nq
        self.d, self.dv = d, dv or d
        self.causal, self.window, self.softcap, self.mask = causal, window, softcap, mask
        self.dtype = np.dtype(dtype)
        self.scale = 1.0 / math.sqrt(d) if scale is None else scale
        self.seed = seed

    @property
    def id(self):
        parts = [f"B{self.b}", f"H{self.hq}" + (f"kv{self.hkv}" if self.hkv != self.hq else "")]
        parts.append(f"N{self.nq}" if self.nq == self.nk else f"Nq{self.nq}-Nk{self.nk}")
        parts.append(f"D{self.d}" + (f"Dv{self.dv}" if self.dv != self.d else ""))
        if self.causal:
            parts.append(f"causal_{self.causal}")
        if self.window:
            parts.append("window_{}_{}".format(*("inf" if w is None else w for w in self.window)))
        if self.softcap:
            parts.append(f"softcap{self.softcap:g}")
        if self.mask:
            parts.append(f"mask_{self.mask}")
        if self.scale != 1.0 / math.sqrt(self.d):
            parts.append(f"scale{self.scale:g}")
        parts.append(self.dtype.name)
        return "-".join(parts)


def make_mask(case, rng):
    """The mask named by case.mask: '<bool|add>_<shape>' with shape key_pad, full, shared, row, head."""
    if case.mask is None:
        return None
    kind, form = case.mask.split("_", 1)
    shape = {
        "key_pad": (case.b, 1, 1, case.nk),
        "full": (case.b, case.hq, case.nq, case.nk),
        "shared": (1, 1, case.nq, case.nk),
        "row": (1, 1, 1, case.nk),
        "head": (1, case.hq, 1, case.nk),
    }[form]
    visible = rng.random(shape) < 0.7
    if form == "key_pad":  # padding at the end of each sequence; batch 0 fully padded
        lengths = rng.integers(1, case.nk + 1, size=case.b)
        lengths[0] = 0
        visible = np.arange(case.nk)[None, None, None, :] < lengths[:, None, None, None]
    elif form in ("full", "shared"):  # a few rows with no visible key at all
        visible[..., :: max(1, case.nq // 5), :] = False
    if kind == "bool":
        return visible
    additive = rng.standard_normal(shape).astype(case.dtype)
    return np.where(visible, additive, case.dtype.type(-np.inf))
