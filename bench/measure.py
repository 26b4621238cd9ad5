"""Measuring one point: time, compile time, peak memory; and the matmul roofline.

Time. CPU: time.perf_counter around each call. CUDA: CUDA events around each
call, read after a synchronisation. The first call is timed on its own; the
steady state is the median of the calls after it, and the first call's excess
over that median is reported as compile time (JIT compilation, autotuning,
caches warming up).

Peak memory. CPU: the process's peak resident set size above a baseline,
which sees every allocator alike (NumPy, torch, Numba, BLAS scratch): free
heap memory is returned to the system (malloc_trim), the baseline RSS is read,
the kernel's high-water mark is reset (/proc/self/clear_refs, "5"), one call
runs, and VmHWM minus the baseline is its peak. Only pages actually touched
count. The baseline includes the inputs (and, for a backward, what the
forward saved), so the figure is what the call itself needs. CUDA:
torch.cuda.max_memory_allocated above memory_allocated before the call
(memory held by torch's caching allocator; other allocators are not seen).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import statistics
import time

MAX_REPEATS = 100

CPU_MEMORY_METHOD = "peak RSS above the baseline after inputs are built (Linux VmHWM, reset per call)"
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated above memory_allocated before the call"


def memory_method(device):
    return CUDA_MEMORY_METHOD if device == "cuda" else CPU_MEMORY_METHOD


def make_inputs(settings, n, layout="bhnd", seed=0):
    """q, k, v and the upstream gradient for one point, as torch tensors on the device.

    Shape (B, H, n, D) for layout "bhnd", (B, n, H, D) for "bnhd", with
    settings.key_heads heads for k and v. When the
    sweep times a backward pass q, k and v require grad; for a forward pass the
    upstream gradient is None.
    """
    import torch

    from .contenders import torch_dtype

    generator = torch.Generator().manual_seed(seed)
    b, d = settings.batch, settings.head_dim
    requires_grad = settings.mode != "forward"

    def draw(h, rows):  # drawn on the CPU so every device sees the same numbers
        x = torch.randn((b, h, rows, d) if layout == "bhnd" else (b, rows, h, d), generator=generator)
        return x.to(device=settings.device, dtype=torch_dtype(settings.dtype))

    nq = settings.queries(n)  # the keys are n; the queries too, unless a decode sweep fixes them
    q, k, v = (draw(h, rows).requires_grad_(requires_grad)
               for h, rows in ((settings.heads, nq), (settings.key_heads, n), (settings.key_heads, n)))
    return q, k, v, draw(settings.heads, nq) if requires_grad else None


def make_step(forward, inputs, mode):
    """Split one timed call into (setup, run).

    setup() does the untimed preparation and returns a state; run(state) is the
    work timed and measured: the forward (under no_grad), the backward of a
    forward done in setup, or forward and backward together.
    """
    import torch

    q, k, v, grad_out = inputs

    def clear_grads():
        for x in (q, k, v):
            x.grad = None

    if mode == "forward":
        def setup():
            return None

        def run(_):
            with torch.no_grad():
                return forward(q, k, v)
    elif mode == "backward":
        def setup():
            clear_grads()
            return forward(q, k, v)

        def run(out):
            out.backward(grad_out)
    elif mode == "both":
        def setup():
            clear_grads()

        def run(_):
            forward(q, k, v).backward(grad_out)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return setup, run


def time_once(setup, run, device):
    """Seconds taken by run(setup()), setup excluded."""
    state = setup()
    if device == "cuda":
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        run(state)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # milliseconds -> seconds
    start = time.perf_counter()
    run(state)
    return time.perf_counter() - start


def summarize(samples):
    """Median, 20th and 80th percentiles (seconds) of a list of timings."""
    if len(samples) == 1:
        return {"median_s": samples[0], "p20_s": samples[0], "p80_s": samples[0]}
    cuts = statistics.quantiles(samples, n=5, method="inclusive")  # 20, 40, 60, 80 %
    return {"median_s": statistics.median(samples), "p20_s": cuts[0], "p80_s": cuts[3]}


def time_calls(setup, run, device, min_repeats=5, min_time_s=0.2):
    """First-call time, then the steady state over at least min_repeats calls.

    Calls continue until they add up to min_time_s (at most MAX_REPEATS).
    Returns median_s, p20_s, p80_s, first_call_s, compile_s, repeats and the
    steady-state samples_s themselves (for pooling rounds).
    """
    first = time_once(setup, run, device)
    samples = []
    while len(samples) < min_repeats or (sum(samples) < min_time_s and len(samples) < MAX_REPEATS):
        samples.append(time_once(setup, run, device))
    timing = summarize(samples)
    timing.update(first_call_s=first, compile_s=max(first - timing["median_s"], 0.0),
                  repeats=len(samples), samples_s=samples)
    return timing


def _status_bytes(field):
    """A memory figure from /proc/self/status (reported there in kB)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def _release_free_heap():
    """Hand freed heap memory back to the system, so re-using it shows up in RSS."""
    gc.collect()
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only
        libc.malloc_trim(0)


def parse_turns(parser, argv):
    """Parse argv with --rounds and --threads added to parser, for the benchmarks that time
    attnkit and torch taking turns in one process; set the threads and warm attnkit up."""
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per contender, taking turns (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch and numba threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1; got {args.rounds}")
    import numba
    import torch

    import attnkit

    if args.threads:
        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    attnkit.warmup()
    return args


def start_peak():
    """Baseline RSS in bytes, with the peak (VmHWM) reset to it and freed heap handed back
    first; None where Linux's /proc/self/clear_refs is missing. peak_above() reads the peak."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        return None
    _release_free_heap()
    baseline = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    return baseline


def peak_above(baseline):
    """Peak RSS bytes since start_peak() returned `baseline`, above it."""
    return max(_status_bytes("VmHWM") - baseline, 0)


def peak_memory(setup, run, device):
    """Peak bytes that run(setup()) needs beyond what existed before it, or None.

    See the module docstring for what is measured. None where it cannot be
    measured (a CPU without Linux's /proc/self/clear_refs).
    """
    if device == "cuda":
        import torch

        state = setup()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        run(state)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - baseline

    state = setup()
    baseline = start_peak()
    if baseline is None:
        return None
    result = run(state)  # noqa: F841 - the result stays alive until the peak is read
    return peak_above(baseline)


def measure_point(contender, settings, n):
    """Time and memory of one contender at sequence length n: a result row without accounting."""
    forward = contender.forward_function(settings, n)
    inputs = make_inputs(settings, n, contender.layout)
    setup, run = make_step(forward, inputs, settings.mode)
    timing = time_calls(setup, run, settings.device, settings.min_repeats, settings.min_time_s)
    return {**timing, "peak_memory_bytes": peak_memory(setup, run, settings.device)}


# A point counts as measured on a busy machine when some task waited for a CPU more than this share of
# the last 10 s (/proc/pressure/cpu, Linux >= 4.20), or, without pressure figures, when the 1-minute
# load average exceeds the cores by more than one (the benchmark's own worker fills every core).
BUSY_PRESSURE_PERCENT = 10.0


def machine_load():
    """{"cpu_pressure": % of the last 10 s some task waited for a CPU, or None, "load_average": 1 min}."""
    pressure = None
    try:
        with open("/proc/pressure/cpu", encoding="ascii") as f:
            for line in f:
                if line.startswith("some"):
                    pressure = float(line.split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        pass
    return {"cpu_pressure": pressure, "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def is_busy(row, cores):
    """Whether a row's recorded load says another program competed for the CPU while it was measured."""
    if row.get("cpu_pressure") is not None:
        return row["cpu_pressure"] > BUSY_PRESSURE_PERCENT
    return row.get("load_average") is not None and row["load_average"] > cores + 1


# The micro-kernel's roofline loop: a tile product shaped like the forward's S = Q K^T (a 128-row query
# block against 512 keys) with a longer reduction (256), so C's traffic does not hide the peak;
# repeated on cache-resident operands by every thread.
_TILE_M, _TILE_N, _TILE_K = 128, 512, 256


def _spin(kind):
    """A parallel Numba function running the micro-kernel's tile product `repeats` times per thread."""
    from numba import njit, prange

    from ..kernels.microkernels import gemm, gemm_f32

    product = gemm_f32 if kind == "float32" else gemm
    depth = _TILE_K if kind == "float32" else _TILE_K // 2  # bf16: pairs of the reduction

    @njit(parallel=True)
    def spin(a, b, c, repeats):
        for t in prange(a.shape[0]):
            for _ in range(repeats):
                product(a[t], b[t], c[t], _TILE_M, _TILE_N, depth, True)

    return spin


def microkernel_rate(kind, seconds=0.3):
    """FLOP/s of attnkit's own micro-kernel ("float32", or "bf16": the target's bf16 kernel) on every
    core: each thread repeats the forward's Q K^T tile product on its own cache-resident operands, the
    most a kernel built from it can reach. Returns (FLOP/s, description)."""
    import numba
    import numpy as np

    from ..kernels.microkernels import BF16_PRODUCTS, PAD, bf16_bits, pack_pairs, padded

    threads = numba.get_num_threads()
    width = padded(_TILE_N, PAD)
    rng = np.random.default_rng(0)
    c = np.zeros((threads, _TILE_M, width), np.float32)
    if kind == "float32":
        a = rng.standard_normal((threads, _TILE_M, _TILE_K)).astype(np.float32)
        b = rng.standard_normal((threads, _TILE_K, width)).astype(np.float32)
        what = "attnkit float32 micro-kernel"
    else:
        a = bf16_bits(rng.standard_normal((threads, _TILE_M, _TILE_K)))
        b = np.zeros((threads, _TILE_K // 2, 2 * width), np.uint16)
        for t in range(threads):
            pack_pairs(bf16_bits(rng.standard_normal((_TILE_K, _TILE_N))), b[t])
        what = f"attnkit bf16 micro-kernel ({BF16_PRODUCTS})"
    spin = _spin(kind)
    spin(a, b, c, 1)  # compile
    repeats, elapsed = 8, 0.0
    while elapsed < seconds:
        repeats *= 2
        start = time.perf_counter()
        spin(a, b, c, repeats)
        elapsed = time.perf_counter() - start
    flops = 2.0 * _TILE_M * _TILE_N * _TILE_K * repeats * threads
    return flops / elapsed, f"{what}, {threads} threads, {_TILE_M}x{_TILE_N}x{_TILE_K} tiles in cache"


def _product_rate(make, multiply, size, repeats, device, budget_s=0.25):
    """(FLOP/s, n) of multiply(a, b) on n x n operands from make(n): n starts at 256 and doubles up to
    size while a product stays well within budget_s. A CPU without bf16 instructions multiplies
    torch's bf16 at ~0.3 GFLOP/s (AMD Zen 3): one 2048^3 product took 59 s."""
    n = min(256, size)
    while True:
        a, b = make(n)
        samples = [time_once(lambda: None, lambda _: multiply(a, b), device) for _ in range(repeats + 1)][1:]
        seconds = statistics.median(samples)
        if n >= size or 8 * seconds > budget_s:
            return 2 * n**3 / seconds, n
        n = min(size, 2 * n)


def matmul_rate(device, dtype, size=None, repeats=None):
    """The best matrix-multiply rate here, in FLOP/s: the roofline for attention.

    Times C = A @ B with square matrices (size x size, smaller where one product would take long)
    in the sweep's dtype: torch.matmul on the device and, on the CPU, NumPy's matmul as well (the
    reference runs on NumPy's BLAS). Returns {"flops_per_s", "what", "rates"}.
    """
    import numpy as np
    import torch

    from .contenders import torch_dtype

    size = size or (8192 if device == "cuda" else 2048)
    repeats = repeats or (10 if device == "cuda" else 3)
    rates, names = {}, {}

    def torch_operands(dtype_name, on):
        return lambda n: tuple(torch.randn(n, n, device=on).to(torch_dtype(dtype_name)) for _ in range(2))

    def record(name, make, multiply, on):
        rates[name], n = _product_rate(make, multiply, size, repeats, on)
        names[name] = f"{name}, {n}x{n}x{n}"

    record(f"torch.matmul {dtype}", torch_operands(dtype, device), torch.matmul, device)
    if device == "cpu" and dtype in ("float32", "float64"):
        rng = np.random.default_rng(0)
        record(f"numpy matmul {dtype}", lambda n: tuple(rng.standard_normal((n, n)).astype(dtype) for _ in range(2)),
               np.matmul, "cpu")  # fmt: skip

    kernel_kind = _cpu_kernel_kind(dtype) if device == "cpu" else None
    if kernel_kind:  # what attnkit's own kernel multiplies with, on every core
        rate, names[f"attnkit {kernel_kind}"] = microkernel_rate(kernel_kind)
        rates[f"attnkit {kernel_kind}"] = rate
    best = max(rates, key=rates.get)
    roofline = {"flops_per_s": rates[best], "what": names[best], "rates": rates}
    if device == "cpu" and dtype != "bfloat16":
        # The bf16 line: what bf16 products (attnkit's bf16 path, float32 under
        # "medium") could reach here, next to the sweep's own dtype.
        record("torch.matmul bfloat16", torch_operands("bfloat16", "cpu"), torch.matmul, "cpu")
        bf16 = {"torch.matmul bfloat16": (rates["torch.matmul bfloat16"], names["torch.matmul bfloat16"])}
        if _cpu_kernel_kind("bfloat16") == "bf16":
            rate, what = microkernel_rate("bf16")
            rates["attnkit bf16"], bf16["attnkit bf16"] = rate, (rate, what)
        rate, what = max(bf16.values())
        roofline["bf16"] = {"flops_per_s": rate, "what": what}
    return roofline


def read_bandwidth(device, size_bytes=256 << 20, repeats=5):
    """The rate this machine reads memory at, bytes/s: torch's sum over a float32 array of
    size_bytes (far beyond the caches), on every torch thread; the roofline of a decode step, which
    reads the K/V cache once. Returns {"bytes_per_s", "what"}."""
    import torch

    x = torch.ones(size_bytes // 4, device=device)
    samples = [time_once(lambda: None, lambda _: x.sum(), device) for _ in range(repeats + 1)][1:]
    threads = f", {torch.get_num_threads()} threads" if device == "cpu" else ""
    return {"bytes_per_s": size_bytes / statistics.median(samples),
            "what": f"torch sum over {size_bytes >> 20} MiB float32{threads}"}


def _cpu_kernel_kind(dtype):
    """Which micro-kernel attnkit's CPU kernel multiplies this dtype with ("float32", "bf16"), or None
    (float64 goes through the BLAS, which numpy's matmul measures)."""
    if dtype == "float64":
        return None
    try:
        from attnkit.backends import cpu_product_path
        from attnkit.kernels.microkernels import F32_PRODUCTS
    except Exception:  # Numba cannot initialise here: torch's and NumPy's rates stand alone
        return None
    path = cpu_product_path(dtype)[0]
    if path == "bf16":
        return "bf16"
    return "float32" if path == "float32" and F32_PRODUCTS == "fma" else None
