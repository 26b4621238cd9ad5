"""Attention in other runtimes a laptop user can `pip install` (attnkit[peers]), as sweep contenders.

- `jax-xla`: jax.nn.dot_product_attention under jax.jit, XLA's CPU backend.
- `onnxruntime-attention`: ONNX's `Attention` operator (opset 23) in an ONNX
  Runtime session on the CPU.
- `onnxruntime-gqa`: ONNX Runtime's `com.microsoft.GroupQueryAttention`
  (causal only: the operator is a decoder's).
- `openvino-sdpa`: OpenVINO's `ScaledDotProductAttention` (opset 13) compiled
  for "CPU", with the inference precision pinned to the input's dtype (OpenVINO
  would otherwise run float32 models in bf16 on CPUs that have it).

Each takes the sweep's torch tensors (B, H, N, D), converts them once per
input set (cached by identity, outside the timed calls after the first) and
returns the runtime's own result, computed to completion. Forward only. Every
runtime uses all cores, as attnkit and torch do. `run_peer(name, q, k, v,
causal)` runs one on NumPy arrays, for the tests.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from .contenders import Contender, _first_line, _tiny_inputs

# (float dtypes each runtime is asked for; the probe in unavailable_reason has the last word)
PEER_DTYPES = {
    "jax-xla": ("float32", "bfloat16", "float16"),
    "onnxruntime-attention": ("float32", "float16"),
    "onnxruntime-gqa": ("float32", "float16"),
    "openvino-sdpa": ("float32", "bfloat16", "float16"),
}


def _threads():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _numpy(x):
    """A torch CPU tensor (or NumPy array) as NumPy, bf16 as ml_dtypes.bfloat16 (no copy where possible)."""
    if isinstance(x, np.ndarray):
        return x
    import torch

    x = x.detach()
    if x.dtype == torch.bfloat16:
        import ml_dtypes

        return x.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.contiguous().numpy()


class _Converted:
    """fn(q, k, v) on NumPy arrays, called with torch tensors. The runtime's function is built for
    the inputs' shapes on first sight (build(shapes) -> (prepare, run)), and the inputs converted
    once per input set: later calls with the same tensors time the runtime alone."""

    def __init__(self, build):
        self.build, self.shapes, self.key, self.inputs = build, None, None, None

    def __call__(self, q, k, v):
        key = tuple(id(x) for x in (q, k, v))
        if key != self.key:
            arrays = [_numpy(x) for x in (q, k, v)]
            shapes = tuple(x.shape for x in arrays)
            if shapes != self.shapes:
                self.shapes, (self.prepare, self.run) = shapes, self.build(shapes)
            self.key, self.inputs = key, self.prepare(*arrays)
        return self.run(*self.inputs)


# ---------------------------------------------------------------------------
# JAX
# ---------------------------------------------------------------------------


def _jax(causal):
    import jax
    import jax.numpy as jnp

    attend = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal))

    def prepare(q, k, v):  # (B, H, N, D) -> JAX's (B, N, H, D), on its device
        return [jax.device_put(jnp.asarray(np.ascontiguousarray(x.transpose(0, 2, 1, 3)))) for x in (q, k, v)]

    return prepare, lambda q, k, v: attend(q, k, v).block_until_ready()


def _from_jax(out):
    return np.asarray(out).transpose(0, 2, 1, 3)  # (B, N, H, D) -> (B, H, N, D)


# ---------------------------------------------------------------------------
# ONNX Runtime
# ---------------------------------------------------------------------------

_ONNX_TYPES = {"float32": 1, "float16": 10, "bfloat16": 16}  # onnx.TensorProto's element types


def _session(graph_nodes, inputs, outputs, opsets):
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(graph_nodes, "attention", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(domain, v) for domain, v in opsets])
    model.ir_version = min(model.ir_version, 10)  # what ONNX Runtime releases of 2025-2026 read
    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads()
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _onnx_attention(causal, dtype, shapes):
    """ONNX Attention (opset 23) on (B, H, N, D) inputs; GQA by its own rule (Hq a multiple of Hkv)."""
    from onnx import helper

    element = _ONNX_TYPES[dtype]
    inputs = [helper.make_tensor_value_info(name, element, list(shape)) for name, shape in zip("qkv", shapes)]
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=int(causal))
    session = _session([node], inputs, [helper.make_tensor_value_info("y", element, None)], [("", 23)])
    return (lambda q, k, v: (q, k, v)), lambda q, k, v: session.run(None, {"q": q, "k": k, "v": v})[0]


def _onnx_gqa(causal, dtype, shapes):
    """com.microsoft GroupQueryAttention: (B, N, H * D) inputs, causal by construction, no cache."""
    from onnx import helper

    if not causal:
        raise ValueError("GroupQueryAttention is causal only (a decoder's operator)")
    (b, hq, n, d), (_, hkv, _, _) = shapes[0], shapes[1]
    element = _ONNX_TYPES[dtype]
    inputs = [helper.make_tensor_value_info("q", element, [b, n, hq * d])]
    inputs += [helper.make_tensor_value_info(name, element, [b, n, hkv * d]) for name in "kv"]
    inputs += [helper.make_tensor_value_info("seqlens_k", 6, [b]), helper.make_tensor_value_info("total", 6, [])]
    outputs = [helper.make_tensor_value_info(name, element, None) for name in ("y", "present_k", "present_v")]
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens_k", "total"],
                            ["y", "present_k", "present_v"], domain="com.microsoft", num_heads=hq,
                            kv_num_heads=hkv)  # fmt: skip
    session = _session([node], inputs, outputs, [("", 21), ("com.microsoft", 1)])
    lengths, total = np.full(b, n - 1, np.int32), np.array(n, np.int32)

    def prepare(q, k, v):
        return [np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(b, n, -1) for x in (q, k, v)]

    def run(q, k, v):
        y = session.run(["y"], {"q": q, "k": k, "v": v, "seqlens_k": lengths, "total": total})[0]
        return y.reshape(b, n, hq, d).transpose(0, 2, 1, 3)

    return prepare, run


# ---------------------------------------------------------------------------
# OpenVINO
# ---------------------------------------------------------------------------

_OV_PRECISION = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def import_openvino():
    """openvino, imported with its usage telemetry off. Its import starts a sender that forks a process
    (a deadlock risk beside JAX's threads, and data nobody asked the benchmark to send); the
    telemetry package's own switch for CI jobs turns it off for this import."""
    if "openvino" not in sys.modules:
        previous = os.environ.get("CI")
        os.environ["CI"] = "true"
        try:
            import openvino  # noqa: F401
        finally:
            if previous is None:
                del os.environ["CI"]
            else:
                os.environ["CI"] = previous
    return sys.modules["openvino"]


def _openvino(causal, dtype, shapes):
    """ScaledDotProductAttention compiled for the CPU. It wants as many kv heads as query heads, so a
    GQA group becomes an axis of its own: q (B, Hkv, G, N, D) against k, v (B, Hkv, 1, N, D)."""
    ov = import_openvino()
    import openvino.opset13 as ops

    (b, hq, n, d), (_, hkv, nk, dv) = shapes[0], shapes[2]
    group = hq // hkv
    element = {"float32": ov.Type.f32, "bfloat16": ov.Type.bf16, "float16": ov.Type.f16}[dtype]
    q = ops.parameter([b, hkv, group, n, d], element)
    k = ops.parameter([b, hkv, 1, nk, d], element)
    v = ops.parameter([b, hkv, 1, nk, dv], element)
    model = ov.Model([ops.scaled_dot_product_attention(q, k, v, causal=causal)], [q, k, v])
    compiled = ov.Core().compile_model(
        model, "CPU", {"INFERENCE_PRECISION_HINT": _OV_PRECISION[dtype], "INFERENCE_NUM_THREADS": _threads()}
    )
    request = compiled.create_infer_request()
    bf16 = dtype == "bfloat16"

    def tensor(x):  # OpenVINO reads bf16 from the raw bits (a bfloat16 array would be converted as float16)
        x = np.ascontiguousarray(x)
        return ov.Tensor(x.view(np.uint16), list(x.shape), ov.Type.bf16) if bf16 else ov.Tensor(x)

    def prepare(q, k, v):
        return [tensor(q.reshape(b, hkv, group, n, d)), tensor(k[:, :, None]), tensor(v[:, :, None])]

    def run(q, k, v):
        request.infer([q, k, v])
        out = request.get_output_tensor(0).data  # bf16 comes back as its bits under a float16 dtype
        if bf16:
            import ml_dtypes

            out = out.view(np.uint16).view(ml_dtypes.bfloat16)
        return out.reshape(b, hq, n, dv)

    return prepare, run


_BUILDERS = {"onnxruntime-attention": _onnx_attention, "onnxruntime-gqa": _onnx_gqa, "openvino-sdpa": _openvino}


def peer_function(name, causal, dtype, shapes):
    """(prepare, run) of one runtime for inputs of these shapes (q, k, v) and dtype name."""
    if name == "jax-xla":
        return _jax(causal)
    return _BUILDERS[name](causal, dtype, shapes)


def run_peer(name, q, k, v, causal):
    """out (B, Hq, Nq, Dv) of one runtime on NumPy q, k, v (B, H, N, D), as a NumPy array."""
    dtype = "bfloat16" if q.dtype.name == "bfloat16" else q.dtype.name
    prepare, run = peer_function(name, causal, dtype, [x.shape for x in (q, k, v)])
    out = run(*prepare(q, k, v))
    return _from_jax(out) if name == "jax-xla" else np.asarray(out)


class PeerRuntimeContender(Contender):
    """One runtime of this module as a sweep contender (CPU, forward)."""

    def __init__(self, name):
        self.name = name
        self.summary = {
            "jax-xla": "jax.nn.dot_product_attention, jit-compiled by XLA",
            "onnxruntime-attention": "ONNX Attention (opset 23) in ONNX Runtime",
            "onnxruntime-gqa": "com.microsoft.GroupQueryAttention in ONNX Runtime",
            "openvino-sdpa": "OpenVINO ScaledDotProductAttention (opset 13)",
        }[name]

    def unavailable_reason(self, settings):
        if settings.device != "cpu":
            return "benchmarked on the CPU only"
        if settings.mode != "forward":
            return "forward only in this adapter"
        if settings.dtype not in PEER_DTYPES[self.name]:
            return f"no {settings.dtype} in this runtime's attention"
        if self.name == "onnxruntime-gqa" and settings.query_len is not None:
            return "adapted for prefill (queries = keys); decode needs its KV-cache inputs (past_key), not adapted"
        try:
            self.forward_function(settings, 16)(*_tiny_inputs(settings))
        except ImportError as error:
            return f"not installed ({_first_line(error)}); pip install 'attnkit[peers]'"
        except Exception as error:  # an unsupported case, reported with the runtime's own words
            return _first_line(error)
        return None

    def forward_function(self, settings, n):
        name, causal, dtype = self.name, settings.causal, settings.dtype
        return _Converted(lambda shapes: peer_function(name, causal, dtype, shapes))


def peer_contenders():
    return [PeerRuntimeContender(name) for name in PEER_DTYPES]
