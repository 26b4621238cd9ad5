"""The Triton kernels compiled ahead of time for sm_80 / sm_90, no GPU needed: registers, spills, HGMMA.

    python -m attnkit.bench.triton_aot [bench/results/triton_aot_report.md]

Each production configuration of kernels/triton_attention.py (production_configs)
is compiled by triton.compile for a GPUTarget; the cuobjdump that triton's wheel
ships reads the cubin: registers and stack bytes per thread, LDL/STL spill
instructions and HGMMA (Hopper warpgroup MMA) instructions in the SASS.
tests/test_triton_aot.py runs it on every forward configuration.
"""

from __future__ import annotations

import os

import torch
import triton

from ..kernels import triton_attention as ta, triton_kernels

_KERNELS = {"fwd": "_fwd_kernel", "dkdv": "_bwd_dkdv_kernel", "dq": "_bwd_dq_kernel"}
_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _jit_function(name):
    """The kernel as a JITFunction (the interpreter's InterpretedFunction holds the Python fn)."""
    kernel = getattr(triton_kernels, name)
    if isinstance(kernel, triton.runtime.jit.JITFunction):
        return kernel
    return triton.runtime.jit.JITFunction(kernel.fn)


def aot_compile(kernel, arch, config, *, dtype=torch.float16, head_dim=128, mask_kind=0,
                causal=False, softcap=False, float_type="fp32"):
    """Compile one kernel configuration for sm_<arch> with no GPU; returns a report dict.

    config = (BLOCK_M, BLOCK_N, num_warps, num_stages). The report has
    registers, stack bytes (spill space), LDL/STL spill instructions counted in
    the SASS and HGMMA instructions (Hopper warpgroup MMA). float_type: the type
    of the float scalar arguments (Triton's launcher passes a Python float as
    fp32; torch.compile's Inductor passes it as fp64).
    """
    fn = _jit_function(_KERNELS[kernel])
    bm, bn, warps, stages = config
    ty = _TRITON_TYPES[dtype]
    block_d = max(16, ta._next_pow2(head_dim))
    constexprs = dict(
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, BLOCK_D=block_d, BLOCK_DV=block_d,
        BLOCK_M=bm, BLOCK_N=bn, MASK_KIND=mask_kind, HAS_LEFT=False, HAS_RIGHT=bool(causal),
        SOFTCAP=bool(softcap), INDEX_64=False,
        DOT_PREC="ieee" if dtype == torch.float32 else "tf32", VARLEN=False, ALIBI=False, DROPOUT=False,
    )
    if "SINKS" in fn.arg_names:  # the forward only
        constexprs["SINKS"] = False
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in ("LSE", "DELTA", "DLSE"):
            signature[arg], attrs[(i,)] = "*fp32", [["tt.divisibility", 16]]
        elif arg == "M":
            signature[arg] = {0: f"*{ty}", 1: "*u8", 2: f"*{ty}"}[mask_kind]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg == "S":  # the mask summary
            signature[arg] = "*i8"
        elif arg in ("CU_Q", "CU_K"):
            signature[arg] = "*i32"
        elif arg in ("ALIBI_SLOPES", "SINK_LOGITS"):
            signature[arg] = "*fp32"
        elif arg.startswith("s_s"):  # its strides (0 on broadcast axes)
            signature[arg] = "i32"
        elif arg in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):  # tensors
            signature[arg], attrs[(i,)] = f"*{ty}", [["tt.divisibility", 16]]
        elif arg.startswith("s_") and arg.endswith("d"):  # unit stride of the head dim
            signature[arg], constexprs[arg] = "constexpr", 1
        elif arg.startswith("s_m"):
            signature[arg] = "i32"
        elif arg.startswith("s_"):
            signature[arg], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
        elif arg in ("qk_scale", "cap_log2", "scale", "keep_scale"):
            signature[arg] = float_type
        elif arg in ("seed", "threshold"):  # dropout's (unused: DROPOUT is off)
            signature[arg] = "i64"
        else:
            signature[arg] = "i32"
    return dict(
        kernel=kernel, arch=f"sm_{arch}", dtype=str(dtype).replace("torch.", ""),
        head_dim=head_dim, causal=bool(causal), block_m=bm, block_n=bn, num_warps=warps,
        num_stages=stages, **compile_report(fn, signature, constexprs, attrs, arch, warps, stages),
    )


def compile_report(fn, signature, constexprs, attrs, arch, warps, stages):
    """triton.compile fn for sm_<arch> (no GPU) and read the cubin with the cuobjdump triton ships:
    registers and stack bytes per thread, LDL/STL spill instructions, HGMMA (Hopper warpgroup) and
    HMMA (Ampere) tensor-core instructions, shared memory."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    cubin = compiled.asm["cubin"]
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([tool, "--dump-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return dict(
        registers=int(regs.group(1)) if regs else None, stack_bytes=int(stack.group(1)) if stack else None,
        spill_loads=len(re.findall(r"\bLDL\b", sass)), spill_stores=len(re.findall(r"\bSTL\b", sass)),
        hgmma=len(re.findall(r"\bHGMMA\b", sass)), mma=len(re.findall(r"\bHMMA\b", sass)),
        shared_bytes=compiled.metadata.shared,
    )


def aot_report(archs=(80, 90), head_dims=(64, 128, 256), dtypes=(torch.float16,),
               kernels=("fwd", "dkdv", "dq"), first_only=False, causal=False):
    """aot_compile for every production configuration; a list of report dicts."""
    rows = []
    for arch in archs:
        for kernel in kernels:
            for d in head_dims:
                for dtype in dtypes:
                    configs = ta.production_configs(kernel, arch // 10, d, dtype)
                    for config in configs[:1] if first_only else configs:
                        rows.append(aot_compile(kernel, arch, config, dtype=dtype, head_dim=d,
                                                causal=causal))
    return rows


def format_aot_report(rows):
    """A markdown table of aot_report rows."""
    lines = [
        "| kernel | arch | dtype | D | BLOCK_M x BLOCK_N | warps | stages | registers | stack (B) "
        "| LDL/STL | HGMMA | shared (B) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {r['head_dim']} | "
            f"{r['block_m']} x {r['block_n']} | {r['num_warps']} | {r['num_stages']} | "
            f"{r['registers']} | {r['stack_bytes']} | {r['spill_loads']}/{r['spill_stores']} | "
            f"{r['hgmma']} | {r['shared_bytes']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m attnkit.bench.triton_aot [report.md]
    import json
    import sys

    table_rows = aot_report(dtypes=(torch.float16, torch.bfloat16))
    text = (f"# Triton flash attention: AOT compilation report (triton {triton.__version__})\n\n"
            + format_aot_report(table_rows) + "\n")
    print(text)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(text)
        with open(os.path.splitext(sys.argv[1])[0] + ".json", "w") as f:
            json.dump({"triton": triton.__version__, "rows": table_rows}, f, indent=1)
