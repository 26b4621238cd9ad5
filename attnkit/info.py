"""What this machine offers attnkit: library versions, CPU, GPUs, usable backends."""

from __future__ import annotations

import importlib
import os
import platform
import sys

# Instruction-set extensions that matter for attention kernels, as Linux names them.
SIMD_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c",
    "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16", "amx_fp16",
    "asimd", "asimdhp", "sve", "sve2",
)

LIBRARIES = ("numpy", "scipy", "numba", "torch", "triton")


def library_versions():
    """{name: version, or 'not installed (reason)'} for the libraries attnkit uses."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            module = importlib.import_module(name)
            versions[name] = getattr(module, "__version__", "unknown version")
        except Exception as error:  # ImportError, or a broken install raising anything
            versions[name] = f"not installed ({type(error).__name__}: {error})"
    return versions


# LLVM's feature names where Linux's /proc/cpuinfo spells them otherwise.
_LLVM_FLAG_NAMES = {"sse4.2": "sse4_2", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16",
                    "avx512fp16": "avx512_fp16", "amx-tile": "amx_tile", "amx-bf16": "amx_bf16",
                    "amx-fp16": "amx_fp16", "neon": "asimd", "fullfp16": "asimdhp"}


def _llvm_host_flags():
    """The host's SIMD features as llvmlite reports them (every OS), in /proc/cpuinfo's names."""
    try:
        import llvmlite.binding as llvm

        features = llvm.get_host_cpu_features()
    except Exception:  # llvmlite missing, or no feature query on this platform
        return set()
    return {_LLVM_FLAG_NAMES.get(name, name) for name, present in features.items() if present}


def cpu_info():
    """CPU model, logical cores, the SIMD extensions from SIMD_FLAGS it has, and the last-level
    cache's size (which decides how the decode kernel reads float32 caches)."""
    from .kernels.cpu.memory import last_level_cache_bytes

    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())  # first processor only
    except OSError:
        pass  # not Linux: the model from platform, no flag list
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    if not flags:  # macOS, Windows: LLVM's view of the host, in Linux's names
        flags = _llvm_host_flags()
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "logical_cores": os.cpu_count(),
        "simd": [f for f in SIMD_FLAGS if f in flags],
        "last_level_cache_bytes": last_level_cache_bytes(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
    }


def cuda_devices():
    """One dict per visible CUDA device, or a reason why there are none."""
    try:
        import torch
    except ImportError:
        return {"devices": [], "reason": "torch is not installed"}
    if not torch.cuda.is_available():
        built = torch.version.cuda
        reason = "torch is a CPU-only build" if built is None else "no CUDA device is visible"
        return {"devices": [], "reason": reason}
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append({
            "index": index,
            "name": props.name,
            "capability": f"sm_{props.major}{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
        })
    return {"devices": devices, "reason": None}


def cpu_blas():
    """The BLAS the Numba kernel's tile products call, or why it is unknown."""
    try:
        from .kernels import cpu_blas as blas
    except Exception as error:  # numba missing or failing to initialise
        return {"name": None, "detail": f"unavailable ({type(error).__name__}: {error})"}
    return {"name": blas.BLAS_NAME, "detail": blas.BLAS_DETAIL}


def cpu_bf16():
    """How the Numba kernel multiplies bf16 tiles here, and why."""
    try:
        from .kernels import microkernels as bf16
    except Exception as error:  # numba missing or failing to initialise
        return {"name": None, "detail": f"unavailable ({type(error).__name__}: {error})"}
    from .kernels.target import TARGET, describe

    error = None
    try:
        bf16.check_paths()
    except ValueError as problem:
        error = str(problem)
    blocks = {kind: list(block) for kind, block in bf16.BLOCKS.items()}
    if bf16.BF16_PRODUCTS == "amx":  # C in 16-row tiles, two of 16 columns side by side (kernels/amx.py)
        blocks["bf16"] = [16, 2]
    return {"name": bf16.BF16_PRODUCTS, "detail": bf16.BF16_DETAIL,
            "float32": bf16.F32_PRODUCTS, "float32_detail": bf16.F32_DETAIL,
            "target": describe(TARGET), "lanes": TARGET.lanes, "registers": TARGET.registers,
            "blocks": blocks, "error": error}


def kernel_cache():
    """Where the Numba kernels' compiled code is cached, and why there."""
    try:
        from pathlib import Path

        from .backends import while_compiling_policy
        from .kernels import jit, numba_attention  # noqa: F401 (the product path names the cached code)
        from .kernels.warmup import cached_units, describe_units
    except Exception as error:  # numba missing or failing to initialise
        return {"path": None, "how": f"unavailable ({type(error).__name__}: {error})", "compiled": None,
                "while_compiling": None}  # fmt: skip
    path, how = jit.cache_location(Path(jit.__file__).parent / "cpu")
    try:
        policy = while_compiling_policy()
    except ValueError as error:
        policy = str(error)
    return {"path": None if path is None else str(path), "how": how, "compiled": describe_units(cached_units()),
            "while_compiling": policy}  # fmt: skip


def collect():
    """Everything `attnkit info` reports, as one JSON-ready dict."""
    from . import __version__, available_backends

    return {
        "attnkit": __version__,
        "executable": sys.executable,
        "versions": library_versions(),
        "cpu": cpu_info(),
        "cpu_blas": cpu_blas(),
        "cpu_bf16": cpu_bf16(),
        "kernel_cache": kernel_cache(),
        "cuda": cuda_devices(),
        "backends": available_backends(),
    }


def format_report(info):
    """The dict from collect() as aligned text."""
    lines = [f"attnkit {info['attnkit']}  ({info['executable']})", "", "libraries:"]
    lines += [f"  {name:<8} {version}" for name, version in info["versions"].items()]
    cpu = info["cpu"]
    lines += [
        "",
        "cpu:",
        f"  model    {cpu['model']}",
        f"  cores    {cpu['logical_cores']} logical ({cpu['machine']}, {cpu['system']})",
        f"  simd     {' '.join(cpu['simd']) or 'none detected'}",
        f"  llc      {cpu['last_level_cache_bytes'] / 2**20:g} MiB  (the last-level cache: decode reads float32 K/V "
        "larger than this a key at a time up to 8 rows a tile)",
        f"  target   {info['cpu_bf16'].get('target', 'unknown')}  (what Numba compiles for; NUMBA_CPU_NAME)",
        f"  blas     {info['cpu_blas']['detail']}  (the numba kernel's tile products; ATTNKIT_CPU_BLAS)",
        f"  bf16     {info['cpu_bf16']['detail']}  (bf16, and float32 under torch's \"medium\"; ATTNKIT_CPU_BF16)",
        f"  float32  {info['cpu_bf16'].get('float32_detail', '')}  (ATTNKIT_CPU_F32)",
        *([f"  error    {info['cpu_bf16']['error']}"] if info["cpu_bf16"].get("error") else []),
        f"  cache    {info['kernel_cache']['path'] or '-'}  ({info['kernel_cache']['how']})",
        f"  compiled {info['kernel_cache'].get('compiled') or '-'}  (kernels in the cache for this target; "
        f"calls of the others run on the reference while helpers compile them: ATTNKIT_WHILE_COMPILING="
        f"{info['kernel_cache'].get('while_compiling')})",
        "",
        "cuda:",
    ]
    cuda = info["cuda"]
    if cuda["devices"]:
        lines += [
            f"  [{d['index']}] {d['name']}, {d['capability']}, {d['memory_gib']} GiB, "
            f"{d['multiprocessors']} SMs"
            for d in cuda["devices"]
        ]
    else:
        lines.append(f"  none: {cuda['reason']}")
    lines += ["", "backends:"]
    lines += [
        f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}"
        for name, reason in info["backends"].items()
    ]
    return "\n".join(lines)
