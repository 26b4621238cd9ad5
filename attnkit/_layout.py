"""Reshaping validated NumPy inputs into the fixed layout the kernels take.

Kernels see q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) with every
leading axis folded into B, and a mask (Bm, Hm, Mq, Nk) whose first three axes
are either 1 (broadcast) or full, so a key-padding mask stays (B, 1, 1, Nk)
instead of growing to (B, H, Nq, Nk).
"""

from __future__ import annotations

import math

import numpy as np

from .reference.attention import sum_to_shape  # noqa: F401  (re-exported for the backends)


def fold_batch(x, batch, contiguous=True):
    """(*batch_x, H, N, D) broadcast to batch, then (B, H, N, D), C-contiguous (contiguous=False:
    in any layout, copied only where the batch axes cannot be merged; the kernels copy what they
    cannot read in place).

    No copy when x already has the full batch and a C-contiguous layout (and
    then the result stays writeable: np.broadcast_to would return a read-only
    view, which the kernels would have to copy).
    """
    if tuple(x.shape[:-3]) != tuple(batch):
        x = np.broadcast_to(x, tuple(batch) + x.shape[-3:])
    x = x.reshape((math.prod(batch),) + x.shape[-3:])
    return np.ascontiguousarray(x) if contiguous else x


def unfold_batch(x, batch):
    """(B, ...) back to (*batch, ...)."""
    return x.reshape(tuple(batch) + x.shape[1:])


def mask_4d(mask, spec, dtype):
    """The mask as (Bm, Hm, Mq, Nk), Bm in {1, B}, Hm in {1, Hq}, Mq in {1, Nq}.

    Additive masks are cast to the kernel's compute dtype; boolean masks stay bool.
    """
    if mask is None:
        return None
    # Axes broadcast by stride 0 (a key-padding mask expanded over heads and queries,
    # as transformers builds it) become size 1 again: no copy, and the kernel sees
    # a mask constant along them.
    mask = mask[tuple(slice(0, 1) if n > 1 and step == 0 else slice(None)
                      for n, step in zip(mask.shape[:-1], mask.strides[:-1]))]
    mask = mask.reshape((1,) * (len(spec.batch) + 3 - mask.ndim) + mask.shape)
    batch_axes, (hm, mq, mk) = mask.shape[:-3], mask.shape[-3:]
    if all(n == 1 for n in batch_axes):
        mask = mask.reshape((1, hm, mq, mk))
    else:
        mask = fold_batch(mask, spec.batch)
    if mk != spec.nk:  # a mask constant along the keys: the kernels index every key
        mask = np.broadcast_to(mask, mask.shape[:-1] + (spec.nk,))
    if mask.dtype != np.bool_:
        mask = mask.astype(dtype, copy=False)
    return np.ascontiguousarray(mask)
