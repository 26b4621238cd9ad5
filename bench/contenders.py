"""Everything the sweep can time: attnkit's backends and the peers.

- attnkit backends: every name in attnkit.available_backends(), called through
  attnkit.attention(q, k, v, causal=..., backend=name); new backends appear
  here without any change.
- torch SDPA, one contender per kernel torch has on the device
  (torch.nn.attention.sdpa_kernel): flash and math on the CPU; cuDNN, flash,
  memory-efficient and math on CUDA.
- FlexAttention, compiled with torch.compile.
- flash-attn's flash_attn_func, when the package is installed (CUDA only).
- JAX, ONNX Runtime (two operators) and OpenVINO on the CPU, when installed
  (attnkit[peers]; bench/peer_runtimes.py).

The parent process asks each contender whether it can run the sweep at all
(`unavailable_reason`, cheap); the worker process builds its forward function
(`forward_function`, where any compilation happens).
"""

from __future__ import annotations

# The NumPy specification materialises the (B, H, Nq, Nk) scores (design.md);
# attnkit's kernels are tiled. The sweep uses this to refuse a point that
# cannot fit before trying it.
ATTNKIT_SCORE_MATRIX_BACKENDS = frozenset({"reference"})

# attnkit backends that compute on the host whatever the tensors' device: on a
# CUDA sweep their memory would not be device memory, so they run in CPU sweeps.
ATTNKIT_HOST_BACKENDS = frozenset({"reference"})

SDPA_KERNELS = {  # our name: (torch.nn.attention.SDPBackend member, devices)
    "flash": ("FLASH_ATTENTION", ("cpu", "cuda")),
    "cudnn": ("CUDNN_ATTENTION", ("cuda",)),
    "efficient": ("EFFICIENT_ATTENTION", ("cuda",)),
    "math": ("MATH", ("cpu", "cuda")),
}


def torch_dtype(name):
    import torch

    return getattr(torch, name)


def _tiny_inputs(settings, layout="bhnd"):
    """Small q, k, v on the sweep's device and dtype, for probing a contender."""
    import torch

    d, group = settings.head_dim, settings.heads // settings.key_heads
    requires_grad = settings.mode != "forward"

    def tensor(h):
        shape = (1, h, 16, d) if layout == "bhnd" else (1, 16, h, d)
        return torch.randn(shape, device=settings.device).to(torch_dtype(settings.dtype)).requires_grad_(requires_grad)

    return [tensor(2 * group), tensor(2), tensor(2)]  # the sweep's ratio of query to kv heads


def _first_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


class Contender:
    """One way of computing attention that the sweep times.

    Tensors are (B, H, N, D) ("bhnd") unless `layout` is "bnhd".
    """

    name = ""
    summary = ""
    layout = "bhnd"
    materializes_scores = False  # holds the (B, H, Nq, Nk) scores: memory grows as N^2

    def unavailable_reason(self, settings):
        """None if it can run this sweep here, else why not (cheap; run in the parent)."""
        return None

    def default_reason(self, settings):
        """None if it belongs to the default set for this sweep, else why not."""
        return None

    def forward_function(self, settings, n):
        """A function (q, k, v) -> out for sequence length n (run in the worker)."""
        raise NotImplementedError


class AttnkitContender(Contender):
    def __init__(self, name):
        self.name = name
        self.summary = f"attnkit.attention(..., backend={name!r})"
        self.materializes_scores = name in ATTNKIT_SCORE_MATRIX_BACKENDS

    def unavailable_reason(self, settings):
        import attnkit

        reason = attnkit.available_backends().get(self.name, "not in attnkit's registry")
        if reason:
            return reason
        if settings.device != "cpu" and self.name in ATTNKIT_HOST_BACKENDS:
            return "computes on the host, so its memory is not device memory: sweep it with --device cpu"
        try:  # explain() validates and chooses without computing anything
            attnkit.explain(*_tiny_inputs(settings), causal=settings.causal, backend=self.name)
        except (TypeError, ValueError) as error:
            return str(error)
        return None

    def forward_function(self, settings, n):
        import attnkit

        name, causal = self.name, settings.causal
        return lambda q, k, v: attnkit.attention(q, k, v, causal=causal, backend=name)


class SdpaContender(Contender):
    def __init__(self, kernel):
        self.kernel = kernel
        self.name = f"torch-sdpa-{kernel}"
        self.summary = f"torch SDPA restricted to its {kernel} kernel"
        self.materializes_scores = kernel == "math"

    def _backend(self):
        from torch.nn.attention import SDPBackend

        return getattr(SDPBackend, SDPA_KERNELS[self.kernel][0])

    def unavailable_reason(self, settings):
        devices = SDPA_KERNELS[self.kernel][1]
        if settings.device not in devices:
            return f"torch SDPA has no {self.kernel} kernel on {settings.device}"
        try:
            forward = self.forward_function(settings, 16)
            out = forward(*_tiny_inputs(settings))
            if settings.mode != "forward":
                out.sum().backward()
        except Exception as error:  # "No available kernel", an unsupported dtype, ...
            return _first_line(error)
        return None

    def forward_function(self, settings, n):
        import torch.nn.functional as F
        from torch.nn.attention import sdpa_kernel

        backend, causal, gqa = self._backend(), settings.causal, settings.grouped

        def forward(q, k, v):
            with sdpa_kernel(backend):
                if gqa:  # the keyword exists from torch 2.5 on; without it, only equal head counts
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return forward


class FlexContender(Contender):
    name = "torch-flex"
    summary = "torch FlexAttention under torch.compile"
    _compiled = None  # one compiled function per worker process; it recompiles per shape

    def unavailable_reason(self, settings):
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError as error:
            return _first_line(error)
        return None

    def default_reason(self, settings):
        if settings.device == "cpu":
            return "compiles C++ with inductor for about a minute per run on the CPU"
        return None

    def forward_function(self, settings, n):
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if FlexContender._compiled is None:
            FlexContender._compiled = torch.compile(flex_attention, dynamic=False)
        compiled = FlexContender._compiled
        block_mask = None
        if settings.causal:
            block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx,
                                           None, None, settings.queries(n), n, device=settings.device)
        gqa = settings.grouped
        return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)


class FlashAttnContender(Contender):
    name = "flash-attn"
    summary = "flash_attn.flash_attn_func (Dao-AILab)"
    layout = "bnhd"

    def unavailable_reason(self, settings):
        if settings.device != "cuda":
            return "runs on CUDA only"
        if settings.dtype not in ("float16", "bfloat16"):
            return f"needs float16 or bfloat16, not {settings.dtype}"
        try:
            import flash_attn  # noqa: F401
        except Exception as error:  # ImportError, or a build that does not match torch
            return f"not installed ({_first_line(error)})"
        return None

    def forward_function(self, settings, n):
        from flash_attn import flash_attn_func

        causal = settings.causal
        return lambda q, k, v: flash_attn_func(q, k, v, causal=causal)


def all_contenders():
    """Every contender the sweep knows, in table order: attnkit's backends, then peers."""
    import attnkit

    contenders = [AttnkitContender(name) for name in attnkit.available_backends()]
    contenders += [SdpaContender(kernel) for kernel in SDPA_KERNELS]
    contenders += [FlexContender(), FlashAttnContender()]
    from .peer_runtimes import peer_contenders  # JAX, ONNX Runtime, OpenVINO (attnkit[peers])

    return contenders + peer_contenders()


def by_name(name):
    for contender in all_contenders():
        if contender.name == name:
            return contender
    raise KeyError(f"no contender named {name!r}")
