"""attnkit's Triton flex kernels compiled ahead of time for sm_80 / sm_90 with no GPU.

    python -m attnkit.bench.flex_aot

The interpreter (tests/test_flex.py) checks what the kernels compute; this checks that a generated
module compiles for a real GPU target, and shows registers, spills and tensor-core instructions per
kernel: forward, dK/dV (with a captured tensor's gradient) and dQ, for a relative-position bias
score_mod and a document mask_mod.
"""

from __future__ import annotations

import torch

from .triton_aot import compile_report

_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def flex_module():
    """A generated Triton flex module: a learnable (H, 2N) bias table and a document mask."""
    from ..flex import _triton_module
    from ..flex.trace import trace_mask_mod, trace_score_mod

    table = torch.zeros(8, 4096, requires_grad=True)
    docs = torch.zeros(2048, dtype=torch.int64)

    def relative(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + 2048]

    def document(b, h, q_idx, kv_idx):
        return docs[q_idx] == docs[kv_idx]

    return _triton_module(trace_score_mod(relative), trace_mask_mod(document))


def _signature(fn, dtype):
    """Argument types as the launcher passes them: the table (C0) float32 and its gradient (G0), the
    document ids (M0) int64, the unused capture slots pointing at q."""
    ty = _TYPES[dtype]
    signature = {}
    for arg in fn.arg_names:
        if arg in ("LSE", "DELTA", "C0", "G0"):
            signature[arg] = "*fp32"
        elif arg == "M0":
            signature[arg] = "*i64"
        elif arg in ("FN", "FI", "PN", "PI"):
            signature[arg] = "*i32"
        elif arg in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV_OUT") or arg[0] in "CMG" and arg[1:].isdigit():
            signature[arg] = f"*{ty}"
        elif arg == "scale":
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    return signature


def flex_aot(arch=90, dtype=torch.bfloat16, head_dim=128, block=(128, 64), warps=8, stages=2, sub=(1, 1)):
    """One report per kernel (forward, dkdv, dq) of the generated module, compiled for sm_<arch>.
    block: the tile (BLOCK_M, BLOCK_N); sub: tiles per block-mask block on each axis (a 128-block
    run as 64-tiles is sub=(2, 2))."""
    module = flex_module()
    rows = []
    for name in ("flex_forward", "flex_backward_dkdv", "flex_backward_dq"):
        fn = getattr(module, name)
        fn = fn if hasattr(fn, "arg_names") else __import__("triton").runtime.jit.JITFunction(fn.fn)
        block_m, block_n = block if name != "flex_backward_dkdv" else (block[1], block[0])
        constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, SUB_M=sub[0], SUB_N=sub[1], BLOCK_D=head_dim, BLOCK_DV=head_dim,
                          DOT_PREC="ieee" if dtype == torch.float32 else "tf32")
        signature = {**_signature(fn, dtype), **{k: "constexpr" for k in constexprs}}
        report = compile_report(fn, signature, constexprs, {}, arch, warps, stages)
        rows.append(dict(kernel=name, arch=f"sm_{arch}", dtype=_TYPES[dtype], head_dim=head_dim,
                         block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages, **report))
    return rows


def main():
    print("| kernel | target | dtype | D | tile | registers | stack | spill ld/st | HGMMA | MMA | shared B |")
    print("| --- | --- | --- | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for arch in (90, 80):
        for row in flex_aot(arch=arch):
            print(f"| {row['kernel']} | {row['arch']} | {row['dtype']} | {row['head_dim']} | "
                  f"{row['block_m']}x{row['block_n']}, {row['num_warps']} warps | {row['registers']} | "
                  f"{row['stack_bytes']} | {row['spill_loads']}/{row['spill_stores']} | {row['hgmma']} | "
                  f"{row['mma']} | {row['shared_bytes']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
