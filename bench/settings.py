"""What one sweep measures, and the defaults for each kind of device."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .accounting import ITEMSIZE, MODES

DEVICES = ("cpu", "cuda")
DTYPES = tuple(ITEMSIZE)

# Chosen so the default CPU sweep ends within about 3 minutes on a busy 2-core
# machine (the NumPy reference at N=4096 is the longest point), and the GPU one
# reaches the lengths where FLOP/s levels off.
DEFAULTS = {
    "cpu": dict(dtype="float32", batch=1, heads=8, head_dim=64,
                ns=(256, 512, 1024, 2048, 4096), min_repeats=5, min_time_s=0.2,
                time_limit_s=10.0),
    "cuda": dict(dtype="bfloat16", batch=1, heads=16, head_dim=128,
                 ns=(512, 1024, 2048, 4096, 8192, 16384, 32768), min_repeats=10, min_time_s=0.1,
                 time_limit_s=10.0),
}


@dataclass(frozen=True)
class Settings:
    """One sweep: N varies, everything else is fixed.

    Tensors are (batch, heads, N, head_dim) for q, and for k and v too unless
    kv_heads is set (grouped-query attention: kv_heads divides heads). A point is
    timed `min_repeats` times at least, and until the timed calls add up to
    `min_time_s` (at most 100 calls). A point is skipped when its predicted peak
    memory passes `memory_budget_bytes` or one call is predicted to take longer
    than `time_limit_s`. With `rounds` > 1 every point is measured that many
    times, the contenders taking turns (A B A B ...), and the timings of all
    rounds are pooled: on a machine whose speed drifts, each contender then
    sees the same spread of conditions.
    """

    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 1
    heads: int = 8
    kv_heads: int | None = None  # None: as many as heads
    query_len: int | None = None  # None: Nq = N; else Nq stays this while N (the keys) grows: decode
    head_dim: int = 64
    causal: bool = False
    mode: str = "forward"
    ns: tuple = (256, 512, 1024, 2048, 4096)
    min_repeats: int = 5
    min_time_s: float = 0.2
    time_limit_s: float = 10.0
    memory_budget_bytes: int = 8 * 2**30
    rounds: int = 1

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        for name in ("batch", "heads", "head_dim", "min_repeats", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.query_len is not None and self.query_len < 1:
            raise ValueError(f"query_len must be at least 1, or None for Nq = N; got {self.query_len}")
        if self.kv_heads is not None and (self.kv_heads < 1 or self.heads % self.kv_heads):
            raise ValueError(f"kv_heads must be a positive divisor of heads ({self.heads}); "
                             f"got {self.kv_heads}")
        if not self.ns or min(self.ns) < 1:
            raise ValueError(f"ns must be positive sequence lengths; got {self.ns!r}")
        object.__setattr__(self, "ns", tuple(sorted(set(int(n) for n in self.ns))))

    @property
    def key_heads(self):
        """Heads of k and v."""
        return self.kv_heads or self.heads

    @property
    def grouped(self):
        """True when several query heads share each kv head (GQA / MQA)."""
        return self.key_heads != self.heads

    def as_dict(self):
        return {**dataclasses.asdict(self), "ns": list(self.ns)}

    @classmethod
    def from_dict(cls, data):
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def describe(self):
        """One line: the fixed parameters of the sweep."""
        causal = "causal" if self.causal else "non-causal"
        heads = f"H={self.heads}" + (f" (kv {self.key_heads})" if self.grouped else "")
        queries = "" if self.query_len is None else f", Nq={self.query_len} against N keys"
        return f"{self.mode}, {self.device}, {self.dtype}, B={self.batch}, {heads}, D={self.head_dim}, {causal}{queries}"

    def queries(self, n):
        """Query rows at sequence length n: n, or query_len for a decode sweep."""
        return n if self.query_len is None else self.query_len

    def tensor_bytes(self, n):
        """Bytes of one (batch, heads, n, head_dim) tensor."""
        return self.batch * self.heads * n * self.head_dim * ITEMSIZE[self.dtype]

    def score_matrix_bytes(self, n):
        """Bytes of the (batch, heads, n, n) score matrix, held in float32 (float64 for float64)."""
        return self.batch * self.heads * n * n * max(ITEMSIZE[self.dtype], 4)


def default_device():
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_memory_budget(device):
    """Half the memory available now on the CPU; 90% of the GPU's total memory."""
    if device == "cuda":
        import torch

        return int(0.9 * torch.cuda.get_device_properties(0).total_memory)
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass  # not Linux
    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return pages * os.sysconf("SC_PAGE_SIZE") // 2 if pages > 0 else 8 * 2**30
