"""One-command GPU check of attnkit's Triton flash-attention kernel.

    python bench/gpu_check.py OUT_DIR [--budget-s 420] [--quick]

On a CUDA machine, in well under 8 minutes, with only torch, triton and numpy
(matplotlib optional), it:

  1. checks correctness in float16 and bfloat16 against a float32 reference
     (forward out and lse, gradients dq/dk/dv; flash-attn's rule: error at most
     2x (3x for gradients) that of a plain attention in the same precision),
     over causal alignments, windows, softcap, masks, GQA, odd head dims and
     strided inputs, plus torch.compile(fullgraph=True) and determinism, and
     attnkit.flash_attn on the card: varlen (forward and gradients, ALiBi,
     windows) and the cache call (paged, bf16 decode) against the reference;
  2. times forward and forward+backward against every torch SDPA backend that
     runs (cuDNN, flash, efficient) and FlexAttention when it compiles, for
     D in {64, 128}, causal and not, N from 512 to 16384 at 16k tokens per
     batch (B = 16384 / N) and H * D = 2048;
  3. prints a TFLOP/s table (forward 4*B*H*N^2*D, halved when causal,
     forward+backward 3.5x that) and writes gpu_check.json (and
     gpu_check.png when matplotlib is installed) into OUT_DIR.

Without a CUDA device it says so and exits with status 2, having checked nothing
(status 0 with --allow-no-gpu, for scripts that run it everywhere).
Works from a plain checkout (no pip install needed) as well as installed
(python -m attnkit.bench.gpu_check).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path


def _import_attnkit():
    """attnkit's Triton modules, installed or from this checkout."""
    try:
        import attnkit  # noqa: F401
    except ImportError:  # a plain checkout: attnkit/__init__.py maps kernels/ and reference/ itself
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from attnkit import torch_ops as triton_ops
    from attnkit.kernels import triton_attention

    return triton_ops, triton_attention


def log(*args):
    print(*args, flush=True)


# ------------------------------------------------------------------------ correctness

def _err(x, ref):
    import torch

    x, ref = x.detach().double(), ref.detach().double()
    same_inf = torch.isinf(ref) & (x == ref)
    d = torch.where(same_inf, torch.zeros_like(x), (x - ref).abs())
    return float(d.max()) if d.numel() else 0.0


def correctness_cases(quick):
    cases = [
        dict(name="D64 N1024", b=2, hq=4, nq=1024, nk=1024, d=64),
        dict(name="D64 N1024 causal", b=2, hq=4, nq=1024, nk=1024, d=64, causal="top_left"),
        dict(name="D128 GQA 8/2 Nq1000 Nk1500 bottom_right", b=1, hq=8, hkv=2, nq=1000, nk=1500,
             d=128, causal="bottom_right"),
        dict(name="D128 top_left Nq1500 Nk1000", b=1, hq=4, nq=1500, nk=1000, d=128, causal="top_left"),
        dict(name="D80 N517", b=2, hq=3, nq=517, nk=517, d=80),
        dict(name="D96 causal N777", b=1, hq=4, nq=777, nk=777, d=96, causal="top_left"),
        dict(name="D160 N400", b=1, hq=2, nq=400, nk=400, d=160),
        dict(name="D256 causal N513", b=1, hq=2, nq=513, nk=513, d=256, causal="top_left"),
        dict(name="D64 window(256,0)+softcap30", b=1, hq=4, nq=2048, nk=2048, d=64,
             window=(256, 0), softcap=30.0),
        dict(name="D64 window(100,50)", b=1, hq=4, nq=1100, nk=1100, d=64, window=(100, 50)),
        dict(name="D64 key padding bool mask", b=2, hq=4, nq=700, nk=900, d=64, mask="key_padding"),
        dict(name="D64 additive (1,H,Nq,Nk) mask", b=1, hq=4, nq=600, nk=650, d=64, mask="additive"),
        dict(name="D64 MQA 6/1 strided (B,N,H,D)", b=2, hq=6, hkv=1, nq=800, nk=800, d=64,
             layout="bnhd", causal="top_left"),
        dict(name="D128 N1 x 239 bottom_right", b=3, hq=4, nq=1, nk=239, d=128, causal="bottom_right"),
    ]
    return cases[:4] if quick else cases


def run_correctness(triton_ops, dtypes, quick):
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = []
    for case in correctness_cases(quick):
        for dtype in dtypes:
            try:
                results.append(_check_case(triton_ops, case, dtype))
            except Exception as error:  # one broken case must not hide the rest
                results.append(dict(case=case["name"], dtype=str(dtype).replace("torch.", ""), ok=False, errors={},
                                    error=f"{type(error).__name__}: {error}"[:400]))
            r = results[-1]
            log(f"  {'ok  ' if r['ok'] else 'FAIL'} {r['case']:<42} {r['dtype']:<9} "
                + " ".join(f"{k}={v['err']:.2e}/{v['plain']:.2e}" for k, v in r["errors"].items())
                + (f" {r['error']}" if "error" in r else ""))
    return results


def _check_case(triton_ops, case, dtype):
    from attnkit.testing import torch_attention  # float32: the reference; own dtype: the error budget

    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    b, hq, hkv = case["b"], case["hq"], case.get("hkv", case["hq"])
    nq, nk, d = case["nq"], case["nk"], case["d"]

    def rand(h, n):
        t = torch.randn(b, n, h, d, device="cuda", generator=g).to(dtype)
        return t.transpose(1, 2) if case.get("layout") == "bnhd" else t.transpose(1, 2).contiguous()

    q, k, v = rand(hq, nq), rand(hkv, nk), rand(hkv, nk)
    mask = None
    if case.get("mask") == "key_padding":
        lengths = torch.tensor([nk, nk // 3], device="cuda")[:b]
        mask = (torch.arange(nk, device="cuda")[None] < lengths[:, None]).reshape(b, 1, 1, nk)
    elif case.get("mask") == "additive":
        mask = torch.randn(1, hq, nq, nk, device="cuda", generator=g).to(dtype)
    opts = dict(scale=1.0 / math.sqrt(d), causal=case.get("causal"), window=case.get("window"),
                softcap=case.get("softcap"))
    d_out = torch.randn(b, hq, nq, d, device="cuda", generator=g).to(dtype)

    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = triton_ops.triton_attention(*leaves, mask, **opts)
    grads = torch.autograd.grad(out, leaves, d_out)
    ref_leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = torch_attention(*ref_leaves, mask, **opts)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, d_out.float())
    plain_leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    plain_out, plain_lse = torch_attention(*plain_leaves, mask, **opts)
    plain_grads = torch.autograd.grad(plain_out, plain_leaves, d_out)

    errors, ok = {}, True
    items = [("out", out, plain_out, ref_out, 2), ("lse", lse, plain_lse, ref_lse, 2)]
    items += [(n, a, p, r, 3) for n, a, p, r in zip(("dq", "dk", "dv"), grads, plain_grads, ref_grads)]
    for name, got, plain, ref, factor in items:
        err, budget = _err(got, ref), _err(plain, ref)
        floor = 1e-3 if dtype == torch.float16 else 8e-3
        passed = (err <= factor * budget + floor * max(1.0, float(ref.abs().nan_to_num(0, 0, 0).max()))
                  and not torch.isnan(got).any())
        ok &= bool(passed)
        errors[name] = dict(err=err, plain=budget, factor=factor, ok=bool(passed))
    return dict(case=case["name"], dtype=str(dtype).replace("torch.", ""), ok=ok, errors=errors)


def run_integration_checks(triton_ops):
    """torch.compile(fullgraph=True) through triton_op/wrap_triton, and bitwise-deterministic grads."""
    import torch

    results = {}
    q, k, v = (torch.randn(2, 4, 600, 64, device="cuda", dtype=torch.float16, requires_grad=True)
               for _ in range(3))

    def loss(q, k, v):
        return triton_ops.triton_attention(q, k, v, scale=0.125, causal=True)[0].float().square().sum()

    try:
        compiled = torch.compile(loss, fullgraph=True)
        got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
        want = torch.autograd.grad(loss(q, k, v), (q, k, v))
        same = all(torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-2) for a, b in zip(got, want))
        results["torch_compile_fullgraph"] = "ok" if same else "MISMATCH"
    except Exception as error:  # report, do not abort the whole check
        results["torch_compile_fullgraph"] = f"FAILED: {type(error).__name__}: {error}"[:300]
    first = torch.autograd.grad(loss(q, k, v), (q, k, v))
    same = all(all(torch.equal(a, b) for a, b in zip(first, torch.autograd.grad(loss(q, k, v), (q, k, v))))
               for _ in range(5))
    results["deterministic_backward"] = "ok" if same else "NOT BITWISE EQUAL"
    results["uses_triton_op"] = triton_ops.USES_TRITON_OP
    for name, value in results.items():
        log(f"  {name}: {value}")
    return results


def run_flash_attn_checks(device="cuda"):
    """attnkit.flash_attn's varlen and cache calls on the card, against attnkit.reference.varlen.

    The varlen kernel's error (forward and gradients) against float64 must stay
    within 2x (3x) the error of the reference run in float32 and stored in the
    input dtype; the cache call (paged, shuffled pages, page size 16) against
    float64 within a fixed bf16/fp16 tolerance. Returns a list of result dicts.
    (device="cpu" runs the same checks on the Numba kernel: the suite does, so
    this code is known to run before a GPU is lent.)
    """
    import numpy as np
    import torch

    from attnkit.flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    from attnkit.reference.varlen import varlen_attention, varlen_attention_backward

    def heads_first(x):
        return x.detach().double().transpose(0, 1).cpu().numpy()

    results = []
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        for causal, window, alibi in ((True, (-1, -1), False), (False, (64, 16), True), (True, (128, 0), True)):
            lengths_q, lengths_k = [1, 113, 1023, 300, 0], [1, 203, 1024, 300, 5]
            cu_q, cu_k = (torch.tensor(np.concatenate([[0], np.cumsum(x)]), dtype=torch.int32)
                          for x in (lengths_q, lengths_k))
            q = torch.randn(sum(lengths_q), 8, 128, generator=generator).to(device, dtype).requires_grad_()
            k, v = (torch.randn(sum(lengths_k), 2, 128, generator=generator).to(device, dtype).requires_grad_()
                    for _ in range(2))
            slopes = torch.rand(len(lengths_q), 8, generator=generator).to(device) * 0.3 if alibi else None
            out = flash_attn_varlen_func(q, k, v, cu_q.to(device), cu_k.to(device), 1023, 1024, causal=causal,
                                         window_size=window, alibi_slopes=slopes)
            d_out = torch.randn(out.shape, generator=generator).to(device, dtype)
            out.backward(d_out)
            options = dict(causal=causal, window=tuple(None if w < 0 else w for w in window),
                           alibi_slopes=None if slopes is None else slopes.double().cpu().numpy())
            if options["window"] == (None, None):
                options["window"] = None
            q64, k64, v64 = (heads_first(x) for x in (q, k, v))
            exact, lse = varlen_attention(q64, k64, v64, cu_q.numpy(), cu_k.numpy(), **options, return_lse=True)
            grads = varlen_attention_backward(q64, k64, v64, exact, heads_first(d_out), lse, cu_q.numpy(),
                                              cu_k.numpy(), **options)
            plain = varlen_attention(*(x.astype(np.float32) for x in (q64, k64, v64)), cu_q.numpy(),
                                     cu_k.numpy(), **options)
            plain = torch.from_numpy(plain).to(dtype).double().numpy()
            plain_grads = varlen_attention_backward(
                *(x.astype(np.float32) for x in (q64, k64, v64, exact, heads_first(d_out), lse)), cu_q.numpy(),
                cu_k.numpy(), **options)
            plain_grads = [torch.from_numpy(g).to(dtype).double().numpy() for g in plain_grads]
            row = dict(check=f"varlen {str(dtype)[6:]} causal={causal} window={window} alibi={alibi}")
            row["out_err"] = float(np.abs(heads_first(out) - exact).max())
            row["plain_err"] = float(np.abs(plain - exact).max())
            row["grad_errs"] = [float(np.abs(heads_first(x.grad) - g).max()) for x, g in zip((q, k, v), grads)]
            row["plain_grad_errs"] = [float(np.abs(p - g).max()) for p, g in zip(plain_grads, grads)]
            row["ok"] = row["out_err"] <= 2 * row["plain_err"] + 1e-3 and all(
                e <= 3 * p + 1e-3 for e, p in zip(row["grad_errs"], row["plain_grad_errs"]))
            results.append(row)
        batch, page, hkv = 4, 16, 8
        lengths = torch.tensor([1, 700, 4000, 33], dtype=torch.int32)
        pages_per_seq = 4096 // page
        table = torch.randperm(batch * pages_per_seq, generator=generator).reshape(batch, -1).to(torch.int32)
        k_cache, v_cache = (torch.randn(batch * pages_per_seq, page, hkv, 128, generator=generator).to(device, dtype)
                            for _ in range(2))
        q = torch.randn(batch, 1, 32, 128, generator=generator).to(device, dtype)
        out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths.to(device), block_table=table.to(device),
                                      causal=True)
        errors = []
        for b in range(batch):
            n = int(lengths[b])
            rows = torch.arange(n)
            keys = k_cache[table[b, rows // page].long().to(device), (rows % page).to(device)]
            values = v_cache[table[b, rows // page].long().to(device), (rows % page).to(device)]
            exact = varlen_attention(heads_first(q[b]), heads_first(keys), heads_first(values), [0, 1], [0, n],
                                     causal=True)
            errors.append(float(np.abs(heads_first(out[b]) - exact).max()))
        results.append(dict(check=f"kvcache paged decode {str(dtype)[6:]}", out_err=max(errors),
                            ok=max(errors) <= (2e-2 if dtype == torch.bfloat16 else 4e-3)))
    for row in results:
        log(f"  {'ok  ' if row['ok'] else 'FAIL'} {row['check']}: " + ", ".join(
            f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}"
            for key, value in row.items() if key not in ("check", "ok")))
    return results


def run_dropout_and_sink_checks(device="cuda"):
    """Dropout and learned sinks on the card (fp16, bf16), against attnkit.reference given the same mask.

    Dropout: the keep mask the kernel drew (read back with scale 0 and v the identity) must equal
    reference.dropout's, and out / dq / dk / dv stay within 2x (3x) the error of the reference run in
    float32 and stored in the input dtype; the same seed must repeat bit for bit. Sinks: out, lse and
    the gradients (dsinks included) likewise. device="cpu" runs it on the Numba kernel (the suite does).
    """
    import numpy as np
    import torch

    import attnkit
    from attnkit.reference import attention as reference
    from attnkit.reference import attention_backward as reference_backward
    from attnkit.reference.dropout import keep_mask

    results = []
    generator = torch.Generator().manual_seed(3)
    zeros_q, zeros_k = torch.zeros(2, 4, 96, 16, device=device), torch.zeros(2, 4, 160, 16, device=device)
    eye = torch.eye(160, device=device).expand(2, 4, 160, 160)
    drawn = attnkit.attention(zeros_q, zeros_k, eye, scale=0.0, dropout_p=0.3, dropout_seed=77)
    drawn = drawn.double().cpu().numpy() * 160 * 0.7 > 0.5
    same_mask = bool(np.array_equal(drawn, keep_mask(77, 0.3, 2, 4, 96, 160)))
    results.append(dict(check="dropout mask = reference.dropout.keep_mask", ok=same_mask))
    for dtype in (torch.float16, torch.bfloat16):
        for kind in ("dropout", "sinks"):
            q = torch.randn(2, 8, 300, 64, generator=generator)
            k, v = (torch.randn(2, 2, 420, 64, generator=generator) for _ in range(2))
            sinks = torch.randn(8, generator=generator) * 2
            d_out = torch.randn(2, 8, 300, 64, generator=generator)
            options = dict(causal="bottom_right")
            numpy_options = dict(causal="bottom_right")
            if kind == "dropout":
                options.update(dropout_p=0.15, dropout_seed=1234)
                numpy_options.update(dropout_p=0.15, dropout_keep=keep_mask(1234, 0.15, 2, 8, 300, 420))
            else:
                numpy_options["sinks"] = sinks.double().numpy()
            leaves = [x.to(device, dtype).requires_grad_() for x in (q, k, v)]
            sink_leaf = sinks.to(device).requires_grad_()
            out = attnkit.attention(*leaves, sinks=sink_leaf if kind == "sinks" else None, **options)
            out.backward(d_out.to(device, dtype))
            exact = [x.double().numpy() for x in (q, k, v)]
            want, lse = reference(*exact, return_lse=True, **numpy_options)
            grads = reference_backward(*exact, want, d_out.double().numpy(), lse, **numpy_options)
            low = [torch.from_numpy(x).to(dtype).float().numpy() for x in exact]
            plain, plain_lse = reference(*low, return_lse=True, **numpy_options)
            plain_grads = reference_backward(*low, plain, d_out.to(dtype).float().numpy(), plain_lse, **numpy_options)
            plain = torch.from_numpy(plain).to(dtype).double().numpy()
            ours = [x.grad for x in leaves] + ([sink_leaf.grad] if kind == "sinks" else [])
            row = dict(check=f"{kind} {str(dtype)[6:]} causal bottom_right GQA 8/2")
            row["out_err"] = float(np.abs(out.detach().double().cpu().numpy() - want).max())
            row["plain_err"] = float(np.abs(plain - want).max())
            row["grad_errs"] = [float(np.abs(g.double().cpu().numpy() - w).max()) for g, w in zip(ours, grads)]
            row["plain_grad_errs"] = [float(np.abs(np.asarray(p, np.float64) - w).max())
                                      for p, w in zip(plain_grads, grads)]  # fmt: skip
            row["ok"] = row["out_err"] <= 2 * row["plain_err"] + 1e-3 and all(
                e <= 3 * p + 1e-3 for e, p in zip(row["grad_errs"], row["plain_grad_errs"]))
            if kind == "dropout":
                again = attnkit.attention(*(x.detach() for x in leaves), **options)
                row["repeats_bitwise"] = bool(torch.equal(again, out.detach()))
                row["ok"] = row["ok"] and row["repeats_bitwise"]
            results.append(row)
    for row in results:
        log(f"  {'ok  ' if row['ok'] else 'FAIL'} {row['check']}: " + ", ".join(
            f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}"
            for key, value in row.items() if key not in ("check", "ok")))
    return results


# ------------------------------------------------------------------------ timing

def time_ms(fn, budget_ms=120.0, max_reps=200):
    """Median milliseconds of fn() with CUDA events, after warm-up."""
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end), 1e-3)
    reps = int(min(max_reps, max(5, budget_ms / estimate)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    return times[len(times) // 2]


def time_pass(call, mode, leaves, d_out):
    """(median ms, None) of call() alone under no_grad (mode "fwd") or with the gradients of leaves
    for d_out ("fwd+bwd"); (None, "Error: its first line") when it cannot run."""
    import torch

    try:
        if mode == "fwd":
            with torch.no_grad():
                return time_ms(call), None
        return time_ms(lambda: torch.autograd.grad(call(), leaves, d_out)), None
    except Exception as error:  # a backend or configuration that cannot run this: report it, go on
        first_line = str(error).splitlines()[0] if str(error) else ""
        return None, f"{type(error).__name__}: {first_line}"[:300]


def _peers():
    """{name: callable(q, k, v, causal) -> out} for every peer that exists in this torch."""
    import torch
    import torch.nn.functional as F

    peers = {}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, backend in (("sdpa_cudnn", "CUDNN_ATTENTION"), ("sdpa_flash", "FLASH_ATTENTION"),
                              ("sdpa_efficient", "EFFICIENT_ATTENTION")):
            if hasattr(SDPBackend, backend):
                def run(q, k, v, causal, _b=getattr(SDPBackend, backend)):
                    with sdpa_kernel(_b):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                peers[name] = run
    except ImportError:
        peers["sdpa_default"] = lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        masks = {}

        def run_flex(q, k, v, causal):
            block_mask = None
            if causal:
                key = (q.shape[2], k.shape[2])
                if key not in masks:
                    masks[key] = create_block_mask(lambda b, h, i, j: j <= i, None, None, *key,
                                                   device="cuda")
                block_mask = masks[key]
            return flex(q, k, v, block_mask=block_mask)

        peers["flex_attention"] = run_flex
    except ImportError:
        pass
    return peers


def run_timing(triton_ops, deadline, quick, dtype_names=("float16",), head_dims=(64, 128), save=None, lengths=None,
               peer_names=None):
    """TFLOP/s rows of attnkit's Triton kernel and every peer, per dtype, head dim, causal flag and N.

    Peers stop being started once `deadline` (time.time()) has passed; attnkit keeps going. `save(rows,
    skipped)` is called after each shape, so a run stopped by a timeout still leaves its figures."""
    import torch

    peers = {name: fn for name, fn in _peers().items() if peer_names is None or name in peer_names}
    backends = {"attnkit_triton": lambda q, k, v, causal: triton_ops.triton_attention(
        q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), causal="top_left" if causal else None)[0]}
    backends.update(peers)
    broken = {}  # backend -> reason, once it fails to run or compile
    rows, skipped = [], []
    if lengths is None:
        lengths = [1024, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    for dtype_name in dtype_names:
        dtype = getattr(torch, dtype_name)
        for d in head_dims:
            for causal in (False, True):
                for n in lengths:
                    b, h = max(1, 16384 // n), 2048 // d
                    flops = 4.0 * b * h * n * n * d * (0.5 if causal else 1.0)
                    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, requires_grad=True)
                               for _ in range(3))
                    d_out = torch.randn(b, h, n, d, device="cuda", dtype=dtype)
                    for name, fn in backends.items():
                        if name in broken:
                            continue
                        if time.time() > deadline and name != "attnkit_triton":
                            skipped.append(f"{name} {dtype_name} D={d} causal={causal} N={n}: time budget spent")
                            continue
                        for mode in ("fwd", "fwd+bwd"):
                            ms, reason = time_pass(lambda: fn(q, k, v, causal), mode, (q, k, v), d_out)
                            if reason is not None:  # a backend that cannot run this shape
                                if name == "flex_attention":
                                    broken[name] = reason
                                skipped.append(f"{name} {dtype_name} D={d} causal={causal} N={n} {mode}: {reason}")
                                break
                            total = flops * (3.5 if mode == "fwd+bwd" else 1.0)
                            rows.append(dict(backend=name, dtype=dtype_name, d=d, causal=causal, n=n, b=b, h=h,
                                             mode=mode, ms=ms, tflops=total / ms / 1e9))
                    q = k = v = d_out = None  # free the card's memory before the next shape
                    torch.cuda.empty_cache()
                    _print_block(rows, dtype_name, d, causal, n)
                    if save is not None:
                        save(rows, skipped)
    return rows, skipped


def run_flex_timing(deadline, lengths=(2048, 8192), head_dims=(64, 128), dtype_name="float16", device="cuda",
                    batch_tokens=16384, width=2048):
    """attnkit.flex_attention on the card against torch.compile(flex_attention), the same BlockMask.

    Two user functions, as bench/flex.py on the CPU: document masking (random boundaries, a mask_mod)
    and a relative-position bias read from an (H, 2N) table (a score_mod). Forward, and forward +
    backward. B * N = 16384, H * D = 2048. Rows: ms of each and torch's time / attnkit's."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import attnkit

    dtype = getattr(torch, dtype_name)
    rows = []
    generator = torch.Generator(device=device).manual_seed(5)
    for n in lengths:
        b = max(1, batch_tokens // n)
        starts = torch.zeros(n, dtype=torch.int64, device=device)
        starts[torch.randperm(n - 1, device=device, generator=generator)[:7] + 1] = 1
        docs = torch.cumsum(starts, 0)

        def document(b_, h_, q_idx, kv_idx):
            return docs[q_idx] == docs[kv_idx]

        block_mask = create_block_mask(document, None, None, n, n, device=device)
        for d in head_dims:
            h = width // d
            table = torch.randn(h, 2 * n, device=device, generator=generator)

            def relative(score, b_, h_, q_idx, kv_idx):
                return score + table[h_, q_idx - kv_idx + n]

            q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, generator=generator).requires_grad_()
                       for _ in range(3))
            d_out = torch.randn(b, h, n, d, device=device, dtype=dtype, generator=generator)
            torch._dynamo.reset()  # a fresh compilation per shape: past the recompile limit torch runs eager flex
            compiled = torch.compile(flex_attention)
            for case, kwargs in (("document mask", dict(block_mask=block_mask)), ("relative bias", dict(score_mod=relative))):
                for mode in ("fwd", "fwd+bwd"):
                    if time.time() > deadline:
                        rows.append(dict(case=case, n=n, d=d, mode=mode, skipped="time budget spent"))
                        continue
                    calls = {"attnkit": lambda: attnkit.flex_attention(q, k, v, backend="triton", **kwargs),
                             "torch_flex_compiled": lambda: compiled(q, k, v, **kwargs)}
                    row = dict(case=case, dtype=dtype_name, n=n, d=d, b=b, h=h, mode=mode)
                    for name, call in calls.items():
                        ms, reason = time_pass(call, mode, (q, k, v), d_out)
                        row.update({f"{name}_ms": ms} if reason is None else {f"{name}_error": reason})
                    if "attnkit_ms" in row and "torch_flex_compiled_ms" in row:
                        row["torch_over_attnkit"] = row["torch_flex_compiled_ms"] / row["attnkit_ms"]
                    rows.append(row)
                    log("  flex " + " ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                                             for key, value in row.items()))
            q = k = v = d_out = None  # free the card's memory before the next shape
            torch.cuda.empty_cache()
    return rows


# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried one at a time by the tune section, at D 128 on sm_90;
# the first of each list is the configuration the launcher tries first today.
TUNE_CANDIDATES = {
    "fwd": [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3)],
    "dkdv": [(32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 4, 3)],
    "dq": [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)],
}


def run_tuning(triton_ops, deadline, dtype_name="bfloat16", n=8192, d=128, causal=False):
    """One configuration at a time (the autotuner given a single choice): forward TFLOP/s per forward
    configuration, then forward + backward per dK/dV and per dQ configuration (the other kernels at
    their first). B * N = 16384, H * D = 2048."""
    import torch

    from attnkit.kernels import triton_attention

    major = torch.cuda.get_device_capability(0)[0]
    dtype = getattr(torch, dtype_name)
    b, h = max(1, 16384 // n), 2048 // d
    flops = 4.0 * b * h * n * n * d * (0.5 if causal else 1.0)
    generator = torch.Generator(device="cuda").manual_seed(7)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=generator).requires_grad_()
               for _ in range(3))
    d_out = torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=generator)
    arch = min(max(major, 8), 9)
    saved = {name: list(triton_attention._CONFIGS[name][arch][128]) for name in TUNE_CANDIDATES}

    def call():
        return triton_ops.triton_attention(q, k, v, scale=d ** -0.5, causal="top_left" if causal else None)[0]

    rows = []
    try:
        for kernel, candidates in TUNE_CANDIDATES.items():
            for config in candidates:
                if time.time() > deadline:
                    rows.append(dict(kernel=kernel, config=list(config), skipped="time budget spent"))
                    continue
                for name in TUNE_CANDIDATES:
                    triton_attention._CONFIGS[name][arch][128] = [config] if name == kernel else saved[name][:1]
                triton_attention._TUNED.clear()
                row = dict(kernel=kernel, config=list(config), dtype=dtype_name, n=n, d=d, causal=causal)
                ms, reason = time_pass(call, "fwd" if kernel == "fwd" else "fwd+bwd", (q, k, v), d_out)
                if reason is None:
                    row.update(ms=ms, tflops=(1.0 if kernel == "fwd" else 3.5) * flops / ms / 1e9)
                else:  # a configuration that does not compile or fit
                    row["error"] = reason
                rows.append(row)
                log(f"  tune {kernel} {config}: " + (f"{row['ms']:.3f} ms, {row['tflops']:.0f} TFLOP/s"
                                                     if "ms" in row else row["error"]))
    finally:
        for name, configs in saved.items():
            triton_attention._CONFIGS[name][arch][128] = configs
        triton_attention._TUNED.clear()
    return rows


def _print_block(rows, dtype_name, d, causal, n):
    here = [r for r in rows if (r["dtype"], r["d"], r["causal"], r["n"]) == (dtype_name, d, causal, n)]
    line = " ".join(f"{r['backend']}:{r['mode']}={r['tflops']:.0f}" for r in here)
    log(f"  {dtype_name} D={d} causal={causal!s:<5} N={n:<6} TFLOP/s {line}")


def print_table(rows):
    names = sorted({r["backend"] for r in rows}, key=lambda s: (s != "attnkit_triton", s))
    for dtype_name in sorted({r["dtype"] for r in rows}):
        for mode in ("fwd", "fwd+bwd"):
            log(f"\n{mode} TFLOP/s ({dtype_name}; B*N = 16384, H*D = 2048)")
            log(f"{'D':>4} {'causal':>6} {'N':>6} " + " ".join(f"{n:>15}" for n in names))
            keys = sorted({(r["d"], r["causal"], r["n"]) for r in rows if (r["mode"], r["dtype"]) == (mode, dtype_name)})
            for d, causal, n in keys:
                cells = []
                for name in names:
                    hit = [r for r in rows if (r["backend"], r["dtype"], r["d"], r["causal"], r["n"], r["mode"]) ==
                           (name, dtype_name, d, causal, n, mode)]
                    cells.append(f"{hit[0]['tflops']:>15.1f}" if hit else f"{'-':>15}")
                log(f"{d:>4} {causal!s:>6} {n:>6} " + " ".join(cells))


def draw_chart(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 4, figsize=(20, 9), sharex=True)
    for col, (d, causal) in enumerate([(64, False), (64, True), (128, False), (128, True)]):
        for row, mode in enumerate(("fwd", "fwd+bwd")):
            ax = axes[row][col]
            for name, dtype_name in sorted({(r["backend"], r["dtype"]) for r in rows}):
                pts = sorted((r["n"], r["tflops"]) for r in rows if (r["backend"], r["dtype"], r["d"], r["causal"],
                                                                    r["mode"]) == (name, dtype_name, d, causal, mode))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{name} {dtype_name}",
                            linewidth=2.5 if name == "attnkit_triton" else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{mode}, D={d}, {'causal' if causal else 'non-causal'}")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default="gpu_check_results", help="folder for JSON/PNG")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="stop starting peer timings after this many seconds (default 420)")
    parser.add_argument("--quick", action="store_true", help="a few cases and lengths only")
    parser.add_argument("--sections", default="correctness,timing,flex",
                        help="comma-separated, of correctness, timing, flex (default: all three)")
    parser.add_argument("--dtypes", default="float16", help="timing dtypes, comma-separated (default float16)")
    parser.add_argument("--head-dims", default="64,128", help="timing head dims, comma-separated (default 64,128)")
    parser.add_argument("--lengths", default=None,
                        help="timing sequence lengths, comma-separated (default 512..16384; --quick 1024,4096)")
    parser.add_argument("--peers", default=None,
                        help="peers to time, comma-separated of sdpa_cudnn, sdpa_flash, sdpa_efficient, "
                             "flex_attention (default: all that run)")
    parser.add_argument("--flex-lengths", default=None, help="flex section lengths (default 2048,8192; --quick 2048)")
    parser.add_argument("--allow-no-gpu", action="store_true",
                        help="exit 0 (not 2) on a machine without a CUDA device, having checked nothing")
    args = parser.parse_args(argv)
    sections = {name.strip() for name in args.sections.split(",") if name.strip()}
    unknown = sections - {"correctness", "timing", "flex", "tune"}
    if unknown:
        parser.error(f"--sections takes correctness, timing, flex and tune; got {', '.join(sorted(unknown))}")
    dtype_names = [name.strip() for name in args.dtypes.split(",") if name.strip()]
    if not dtype_names or set(dtype_names) - {"float16", "bfloat16", "float32"}:
        parser.error(f"--dtypes takes float16, bfloat16 and float32; got {args.dtypes!r}")
    def integers(text, option):
        try:
            return [int(x) for x in text.split(",")] if text is not None else None
        except ValueError:
            parser.error(f"{option} takes comma-separated integers; got {text!r}")

    head_dims = integers(args.head_dims, "--head-dims")
    lengths, flex_lengths = integers(args.lengths, "--lengths"), integers(args.flex_lengths, "--flex-lengths")
    peer_names = None if args.peers is None else [name.strip() for name in args.peers.split(",") if name.strip()]
    started = time.time()

    import torch

    if not torch.cuda.is_available():
        log("gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False): "
            "nothing checked; run this on a machine with an NVIDIA GPU.")
        return 0 if args.allow_no_gpu else 2
    triton_ops, kernels = _import_attnkit()
    import triton

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    info = dict(device=props.name, capability=list(torch.cuda.get_device_capability(0)),
                torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d"), argv=sys.argv[1:] if argv is None else list(argv))
    log(f"gpu_check on {info['device']} (sm_{''.join(map(str, info['capability']))}), torch "
        f"{info['torch']}, triton {info['triton']}")
    report = dict(info=info, correctness=[], integration={}, timings=[], skipped=[], flex=[], tune=[])

    def save(**parts):
        """Write the JSON now: a run stopped by a timeout keeps what it measured."""
        report.update(parts, seconds=time.time() - started)
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1))

    if "correctness" in sections:
        log("\n[correctness] vs float32 reference (err/plain-error per output)")
        correctness = run_correctness(triton_ops, [torch.float16, torch.bfloat16], args.quick)
        save(correctness=correctness)
        try:
            integration = run_integration_checks(triton_ops)
        except Exception as error:  # report, do not abort the rest
            integration = {"error": f"{type(error).__name__}: {error}"[:300]}
            log(f"  FAIL integration checks: {error}")
        save(integration=integration)
        for name, checks in (("flash_attn", run_flash_attn_checks), ("dropout and sinks", run_dropout_and_sink_checks)):
            try:
                correctness += checks()
            except Exception as error:  # report, do not abort the timing that follows
                correctness.append(dict(check=name, ok=False, error=f"{type(error).__name__}: {error}"[:300]))
                log(f"  FAIL {name} checks: {error}")
            save(correctness=correctness)
        log(f"  correctness: {sum(r['ok'] for r in correctness)}/{len(correctness)} cases pass "
            f"({time.time() - started:.0f} s so far)")

    if "timing" in sections:
        log(f"\n[timing] {', '.join(dtype_names)}, D {', '.join(map(str, head_dims))}")
        rows, skipped = run_timing(triton_ops, started + args.budget_s, args.quick, dtype_names, head_dims,
                                   save=lambda rows, skipped: save(timings=rows, skipped=skipped), lengths=lengths,
                                   peer_names=peer_names)
        print_table(rows)
        for line in skipped:
            log(f"  skipped: {line}")
        save(timings=rows, skipped=skipped)

    if "flex" in sections:
        log(f"\n[flex] attnkit.flex_attention (Triton) vs torch.compile(flex_attention), float16, D "
            f"{', '.join(map(str, head_dims))}")
        try:
            flex_rows = run_flex_timing(started + args.budget_s + 60, lengths=flex_lengths or
                                        ((2048,) if args.quick else (2048, 8192)), head_dims=head_dims)
        except Exception as error:  # report, do not lose the rest
            flex_rows = [dict(error=f"{type(error).__name__}: {error}"[:400])]
            log(f"  FAIL flex timing: {error}")
        save(flex=flex_rows)

    if "tune" in sections:
        log("\n[tune] one configuration at a time, bfloat16, D 128, N 8192, not causal")
        try:
            tune_rows = run_tuning(triton_ops, started + args.budget_s + 120)
        except Exception as error:  # report, do not lose the rest
            tune_rows = [dict(error=f"{type(error).__name__}: {error}"[:400])]
            log(f"  FAIL tuning: {error}")
        save(tune=tune_rows)

    chart = bool(report["timings"]) and draw_chart(report["timings"], out_dir / "gpu_check.png")
    log(f"\nwrote {out_dir / 'gpu_check.json'}" + (f" and {out_dir / 'gpu_check.png'}" if chart else ""))
    failed = [r for r in report["correctness"] if not r["ok"]]
    log(f"done in {time.time() - started:.0f} s; "
        + ("ALL CORRECTNESS CHECKS PASS" if not failed else f"{len(failed)} CORRECTNESS FAILURES")
        + ("" if "correctness" in sections else " (correctness not run)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
