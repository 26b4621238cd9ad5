"""Planned calls (attnkit/planned.py): a repeated inference call runs as one lookup and one kernel
entry, gives what the full path gives, and is never used for a call it does not fit."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import attnkit
from attnkit import api, planned
from attnkit.kernels.numba_attention import recording
from attnkit.reference import attention as reference
from attnkit.reference import attention_backward as reference_backward


def _numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().float().numpy() if x.dtype == torch.bfloat16 else x.detach().numpy()
    return x


def _fresh(shape, dtype, rng, array="torch"):
    x = rng.standard_normal(shape).astype(np.float32)
    if array == "numpy":
        return x.astype(dtype)
    return torch.from_numpy(x).to(dtype)


@pytest.fixture
def full_path_refused(monkeypatch):
    """Inside the block every call must come from its plan: the full path raises."""

    def refuse(*args, **kwargs):
        raise AssertionError("the full path ran")

    return lambda: monkeypatch.setattr(api, "_attend", refuse)


CASES = {
    # id: (q shape, kv shape, dtype, array type, sdpa keyword arguments)
    "tiny-fp32": ((1, 4, 32, 32), (1, 4, 32, 32), torch.float32, "torch", {}),
    "one-row-fp32": ((1, 1, 1, 64), (1, 1, 1, 64), torch.float32, "torch", {}),
    "decode-gqa-fp32": ((2, 8, 1, 64), (2, 2, 40, 64), torch.float32, "torch", dict(enable_gqa=True)),
    "causal-odd-fp64": ((2, 3, 37, 24), (2, 3, 53, 24), torch.float64, "torch", dict(is_causal=True, scale=0.3)),
    "bf16": ((1, 4, 33, 64), (1, 4, 33, 64), torch.bfloat16, "torch", dict(is_causal=True)),
    "three-axes": ((4, 17, 16), (4, 17, 16), torch.float32, "torch", {}),
    "five-axes": ((2, 3, 2, 9, 8), (2, 3, 2, 9, 8), torch.float32, "torch", {}),
    "parallel-fp32": ((1, 4, 256, 64), (1, 4, 256, 64), torch.float32, "torch", dict(is_causal=True)),
    "numpy-fp32": ((2, 2, 19, 16), (2, 2, 23, 16), np.float32, "numpy", {}),
    "numpy-fp64-gqa": ((1, 4, 5, 16), (1, 2, 30, 16), np.float64, "numpy", dict(enable_gqa=True)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_planned_call_gives_the_full_paths_result(case, full_path_refused):
    q_shape, kv_shape, dtype, array, options = case
    rng = np.random.default_rng(sum(q_shape))
    api.clear_plans()
    q, k, v = (_fresh(s, dtype, rng, array) for s in (q_shape, kv_shape, kv_shape))
    first = attnkit.scaled_dot_product_attention(q, k, v, **options)  # the full path, which plans it
    assert planned.count() == 1
    full_path_refused()
    again = attnkit.scaled_dot_product_attention(q, k, v, **options)
    assert type(again) is type(q) and again.dtype == q.dtype and again.shape == first.shape
    np.testing.assert_array_equal(_numpy(again), _numpy(first))
    # New values through the same plan, against the reference (fp64) by the kernel's tolerance.
    q, k, v = (_fresh(s, dtype, rng, array) for s in (q_shape, kv_shape, kv_shape))
    out = attnkit.scaled_dot_product_attention(q, k, v, **options)
    want = reference(*(_numpy(x).astype(np.float64) for x in (q, k, v)), causal=options.get("is_causal", False),
                     scale=options.get("scale"))  # fmt: skip
    tol = {torch.bfloat16: 3e-2, torch.float64: 1e-10, np.float64: 1e-10}.get(dtype, 2e-5)
    np.testing.assert_allclose(_numpy(out).astype(np.float64), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("route", ["uint16", "int16"])
def test_bf16_bits_reach_the_kernel_through_either_torch_dtype_with_the_same_results(route, monkeypatch):
    """torch.uint16 converts to and from NumPy (torch 2.3 on); older releases go through int16 and a
    NumPy view. Both routes hand the kernel the same bits and give back the same bf16 results."""
    rng = np.random.default_rng(7)
    q, k, v = (_fresh(s, torch.bfloat16, rng) for s in ((2, 4, 1, 64), (2, 4, 40, 64), (2, 4, 40, 64)))
    api.clear_plans()
    first = attnkit.scaled_dot_product_attention(q, k, v)  # the full path, which plans it
    names = planned._torch_names()
    assert names[4] is torch.uint16 and names[5]  # this torch converts uint16: the planned calls' route
    if route == "int16":
        monkeypatch.setattr(planned, "_TORCH", [names[:4] + (torch.int16, False) + names[6:]])
    monkeypatch.setattr(api, "_attend", lambda *a, **kw: pytest.fail("the full path ran"))
    again = attnkit.scaled_dot_product_attention(q, k, v)
    assert again.dtype == torch.bfloat16 and again.shape == first.shape
    assert torch.equal(again.view(torch.int16), first.view(torch.int16))
    q2 = _fresh(q.shape, torch.bfloat16, rng)  # new values through the plan, against the reference
    out = attnkit.scaled_dot_product_attention(q2, k, v)
    want = reference(*(_numpy(x).astype(np.float64) for x in (q2, k, v)))
    np.testing.assert_allclose(_numpy(out).astype(np.float64), want, atol=3e-2, rtol=3e-2)
    assert planned._bits_dtype(torch) is torch.uint16


def test_attention_plans_its_options_and_the_lse(full_path_refused):
    rng = np.random.default_rng(1)
    q, k, v = (_fresh((2, 4, 21, 32), torch.float32, rng) for _ in range(3))
    options = dict(causal="bottom_right", window=(5, 0), softcap=20.0, scale=0.2)
    api.clear_plans()
    out, lse = attnkit.attention(q, k, v, return_lse=True, **options)
    plain = attnkit.attention(q, k, v, **options)  # the same plan without the lse
    full_path_refused()
    out2, lse2 = attnkit.attention(q, k, v, return_lse=True, **options)
    assert torch.equal(out2, out) and torch.equal(lse2, lse) and torch.equal(attnkit.attention(q, k, v, **options), plain)
    want, want_lse = reference(*(x.double().numpy() for x in (q, k, v)), return_lse=True, causal="bottom_right",
                               window=(5, 0), softcap=20.0, scale=0.2)  # fmt: skip
    np.testing.assert_allclose(out2.double().numpy(), want, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse2.double().numpy(), want_lse, atol=2e-5, rtol=2e-5)


def test_each_planned_call_returns_new_memory():
    rng = np.random.default_rng(2)
    q, k, v = (_fresh((1, 2, 8, 16), torch.float32, rng) for _ in range(3))
    api.clear_plans()
    first = attnkit.scaled_dot_product_attention(q, k, v)
    second = attnkit.scaled_dot_product_attention(q, k, v)
    kept = second.clone()
    third = attnkit.scaled_dot_product_attention(q * 2, k, v)
    assert third.data_ptr() not in (first.data_ptr(), second.data_ptr())
    assert torch.equal(second, kept)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("entry", ["sdpa", "attention"])
def test_inputs_that_require_grad_get_their_gradients_after_a_planned_call(entry, dtype):
    """requires_grad is not in the key: a planned signature called with q, k or v requiring grad must
    take the full path and record the backward (bf16's bits were read through an int16 view, which
    drops requires_grad: the output came back without a grad_fn)."""
    rng = np.random.default_rng(13)
    q, k, v = (_fresh(s, dtype, rng) for s in ((2, 4, 3, 16), (2, 2, 9, 16), (2, 2, 9, 8)))
    call = (lambda *x: attnkit.scaled_dot_product_attention(*x, enable_gqa=True)) if entry == "sdpa" else attnkit.attention
    api.clear_plans()
    call(q, k, v)
    call(q, k, v)  # planned, and entered directly
    d_out = torch.from_numpy(rng.standard_normal((2, 4, 3, 8))).to(dtype)
    exact = [x.double().numpy() for x in (q, k, v)]
    out, lse = reference(*exact, return_lse=True)
    want = reference_backward(*exact, out, d_out.double().numpy(), lse)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    for which in range(3):
        inputs = [x.clone().requires_grad_(i == which) for i, x in enumerate((q, k, v))]
        out = call(*inputs)
        assert out.grad_fn is not None, f"input {which} requires grad, the output has no grad_fn"
        (grad,) = torch.autograd.grad(out, inputs[which], d_out)
        np.testing.assert_allclose(grad.double().numpy(), want[which], atol=tol, rtol=tol)


def test_calls_the_key_does_not_cover_take_the_full_path():
    rng = np.random.default_rng(3)
    q, k, v = (_fresh((1, 2, 12, 16), torch.float32, rng) for _ in range(3))
    api.clear_plans()
    attnkit.scaled_dot_product_attention(q, k, v)  # planned
    want = reference(*(x.double().numpy() for x in (q, k, v)))

    # A tensor that requires grad: the full path, with its backward.
    q_grad = q.clone().requires_grad_()
    out = attnkit.scaled_dot_product_attention(q_grad, k, v)
    out.sum().backward()
    assert out.grad_fn is not None and q_grad.grad is not None and q_grad.grad.abs().sum() > 0
    # The same values in another layout (a transposed view), read-only NumPy arrays; another byte order.
    q_strided = q.transpose(2, 3).contiguous().transpose(2, 3)
    assert not q_strided.is_contiguous()
    for _ in range(2):  # its strides make a key and a plan of their own, which copies q on every call
        np.testing.assert_allclose(attnkit.scaled_dot_product_attention(q_strided, k, v).double().numpy(), want,
                                   atol=2e-5, rtol=2e-5)  # fmt: skip
    (strided_call,) = [call for key, call in planned._CALLS.items() if key[8] == q_strided.numpy().strides]
    assert not strided_call.contiguous_tensors
    arrays = [x.numpy().copy() for x in (q, k, v)]
    attnkit.scaled_dot_product_attention(*arrays)  # planned for NumPy
    for x in arrays:
        x.flags.writeable = False
    np.testing.assert_allclose(attnkit.scaled_dot_product_attention(*arrays), want, atol=2e-5, rtol=2e-5)
    with pytest.raises(TypeError, match="q has dtype >f4"):  # validated, though shapes match a plan
        attnkit.scaled_dot_product_attention(*[x.astype(">f4") for x in arrays])
    # A subclass of Tensor (a Parameter) is never planned as q, k or v; neither are masks, dropout.
    parameter = torch.nn.Parameter(q.clone(), requires_grad=False)
    attnkit.scaled_dot_product_attention(parameter, k, v)
    mask = torch.ones(12, 12, dtype=torch.bool).tril()
    attnkit.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    attnkit.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    attnkit.attention(q, k, v, alibi_slopes=torch.ones(2))
    assert planned.count() == 3  # the contiguous, the strided and the NumPy calls' plans only


@pytest.mark.parametrize("layout", ["contiguous", "head-major-view"])
def test_a_key_of_contiguous_tensors_enters_the_serial_function_unchecked(layout, monkeypatch):
    """Its key's strides vouch for the arrays: no check of them per call (numba_attention.enterable),
    including a decode query made by a transpose, whose axis of length 1 has another stride."""
    from attnkit.kernels import numba_attention

    rng = np.random.default_rng(11)
    if layout == "contiguous":
        q = _fresh((2, 4, 1, 32), torch.float32, rng)
    else:  # (B, 1, H, D) projected, viewed (B, H, 1, D): C-contiguous by NumPy's rule
        q = _fresh((2, 1, 4, 32), torch.float32, rng).transpose(1, 2)
        assert q.numpy().flags.c_contiguous and q.numpy().strides[2] != 32 * 4
    k, v = (_fresh((2, 4, 50, 32), torch.float32, rng) for _ in range(2))
    api.clear_plans()
    for _ in range(3):  # planned; then the kernel's entry is known and the serial function made
        attnkit.scaled_dot_product_attention(q, k, v)
    (call,) = planned._CALLS.values()
    assert call.contiguous_tensors and call.plan.serial is not None
    monkeypatch.setattr(numba_attention, "enterable", lambda *a: pytest.fail("the arrays were checked"))
    monkeypatch.setattr(api, "_attend", lambda *a, **kw: pytest.fail("the full path ran"))
    q2 = _fresh((2, 4, 1, 32), torch.float32, rng) if layout == "contiguous" else _fresh(
        (2, 1, 4, 32), torch.float32, rng).transpose(1, 2)
    out = attnkit.scaled_dot_product_attention(q2, k, v)
    want = reference(*(x.double().numpy() for x in (q2, k, v)))
    np.testing.assert_allclose(out.double().numpy(), want, atol=2e-5, rtol=2e-5)


def test_a_plan_follows_torchs_float32_matmul_precision():
    from attnkit.kernels.microkernels import BF16_DOT

    if not BF16_DOT:
        pytest.skip("this CPU has no bf16 products: every precision runs float32 products")
    rng = np.random.default_rng(4)
    q, k, v = (_fresh((1, 2, 24, 64), torch.float32, rng) for _ in range(3))
    before = torch.get_float32_matmul_precision()
    try:
        api.clear_plans()
        highest = attnkit.scaled_dot_product_attention(q, k, v)
        torch.set_float32_matmul_precision("medium")
        medium = attnkit.scaled_dot_product_attention(q, k, v)  # a new key: planned apart
        api.clear_plans()
        assert torch.equal(attnkit.scaled_dot_product_attention(q, k, v), medium)  # the full path's bits
        assert not torch.equal(medium, highest)
    finally:
        torch.set_float32_matmul_precision(before)


def test_planned_calls_run_the_kernel_that_the_full_path_runs():
    rng = np.random.default_rng(5)
    q, k, v = (_fresh((1, 4, 1, 64), torch.float32, rng) for _ in range(3))
    k, v = (_fresh((1, 4, 300, 64), torch.float32, rng) for _ in range(2))
    api.clear_plans()
    with recording() as full:
        attnkit.scaled_dot_product_attention(q, k, v)
    with recording() as fast:
        attnkit.scaled_dot_product_attention(q, k, v)
    assert [launch.worker for launch in fast] == [launch.worker for launch in full] and full


def test_validation_still_runs_before_a_plan_is_used():
    q = torch.randn(1, 2, 8, 16)
    api.clear_plans()
    attnkit.scaled_dot_product_attention(q, q, q)
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        attnkit.scaled_dot_product_attention(q, q, q, is_causal=1)
    with pytest.raises(TypeError, match="enable_gqa must be a bool"):
        attnkit.scaled_dot_product_attention(q, q, q, enable_gqa=None)
    with pytest.raises(ValueError, match="backend must be one of"):
        attnkit.scaled_dot_product_attention(q, q, q, backend="nope")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sinks_are_planned_as_a_models_parameter_under_no_grad(dtype, full_path_refused):
    """gpt-oss's inference calls: the sinks a Parameter (requires_grad) of the model, run under no_grad."""
    rng = np.random.default_rng(6)
    q = _fresh((1, 8, 1, 64), dtype, rng)
    k, v = (_fresh((1, 2, 70, 64), dtype, rng) for _ in range(2))
    sinks = torch.nn.Parameter(_fresh((8,), dtype, rng) * 3)
    api.clear_plans()
    with torch.no_grad():
        first = attnkit.attention(q, k, v, sinks=sinks)
        assert planned.count() == 1
        full_path_refused()
        again = attnkit.attention(q, k, v, sinks=sinks)
        sinks.data += 1  # new values in place, the same plan
        moved = attnkit.attention(q, k, v, sinks=sinks)
        want = reference(*(_numpy(x).astype(np.float64) for x in (q, k, v)), sinks=_numpy(sinks).astype(np.float64))
        sinks.data = sinks.data * 0 - 2  # a new storage under the same parameter
        replaced = attnkit.attention(q, k, v, sinks=sinks)
    assert torch.equal(again, first)
    tol = 3e-2 if dtype == torch.bfloat16 else 2e-5
    np.testing.assert_allclose(_numpy(moved).astype(np.float64), want, atol=tol, rtol=tol)
    want = reference(*(_numpy(x).astype(np.float64) for x in (q, k, v)), sinks=_numpy(sinks).astype(np.float64))
    np.testing.assert_allclose(_numpy(replaced).astype(np.float64), want, atol=tol, rtol=tol)


def test_sinks_that_need_a_gradient_take_the_full_path():
    rng = np.random.default_rng(7)
    q, k, v = (_fresh((1, 4, 6, 16), torch.float32, rng) for _ in range(3))
    sinks = torch.zeros(4, requires_grad=True)
    api.clear_plans()
    attnkit.attention(q, k, v, sinks=sinks.detach())  # planned without a gradient
    out = attnkit.attention(q, k, v, sinks=sinks)
    out.sum().backward()
    assert sinks.grad is not None and sinks.grad.abs().sum() > 0


def test_torch_compile_traces_the_operator_not_the_planned_call():
    q, k, v = (torch.randn(1, 2, 16, 32) for _ in range(3))
    api.clear_plans()
    eager = attnkit.scaled_dot_product_attention(q, k, v, is_causal=True)
    attnkit.scaled_dot_product_attention(q, k, v, is_causal=True)  # planned now
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: attnkit.scaled_dot_product_attention(q, k, v, is_causal=True) * 2.0,
                             fullgraph=True)  # fmt: skip  (a graph break would raise)
    torch.testing.assert_close(compiled(q, k, v), eager * 2.0, atol=0, rtol=0)


ENTRY_CASES = {
    # id: (q shape, kv shape, dtype, with sinks): the forward kernel on the calling thread and in
    # parallel, the decode kernel (keys split), bf16, and sinks from a model's parameter.
    "forward-small": ((1, 2, 20, 16), (1, 2, 20, 16), torch.float32, False),
    "forward-parallel-fp64": ((1, 4, 160, 32), (1, 4, 160, 32), torch.float64, False),
    "decode-split-bf16": ((1, 4, 1, 64), (1, 1, 1500, 64), torch.bfloat16, False),
    "decode-sinks": ((2, 8, 1, 32), (2, 2, 90, 32), torch.float32, True),
    "decode-mha-bf16": ((2, 4, 1, 32), (2, 4, 300, 32), torch.bfloat16, False),
    "decode-gqa-fp32": ((4, 8, 1, 64), (4, 2, 70, 64), torch.float32, False),
}
# Plans that run as one function (ForwardPlan.serial): a small forward, and a decode without sinks.
# decode-split-bf16 has one too, which gives the call back to run() whenever its keys are split.
_SERIAL = {"forward-small", "decode-split-bf16", "decode-mha-bf16", "decode-gqa-fp32"}


@pytest.mark.parametrize("case_id", ENTRY_CASES)
def test_a_plan_enters_the_kernel_compiled_for_its_arguments_own_types(case_id):
    """From its second call a plan calls the kernel's compiled entry directly, skipping Numba's
    dispatcher (launch.KernelCall): that entry must be the one compiled for the exact types of the
    arguments of every later call, whatever the inputs' layout (copied when not C-contiguous,
    aligned and writeable), as the dispatcher would have chosen it (the decode kernel's K and V: as
    layout 'A' arrays, launch.KernelCall's any_layout)."""
    import numba
    from attnkit.kernels.numba_attention import _serial_decode, _serial_forward

    q_shape, kv_shape, dtype, with_sinks = ENTRY_CASES[case_id]
    rng = np.random.default_rng(8)
    q, k, v = (_fresh(s, dtype, rng) for s in (q_shape, kv_shape, kv_shape))
    sinks = _fresh(q_shape[1:2], torch.float32, rng) if with_sinks else None
    api.clear_plans()
    for _ in range(3):  # full path (planned), second call (entry looked up), third (entered)
        attnkit.attention(q, k, v, sinks=sinks)
    call = planned.lookup(planned.key(("attention", False, bool, None, type(None), None, None, type(None), None, "auto"),
                                      q, k, v, sinks))  # fmt: skip
    assert call is not None
    plan, seen = call.plan, []
    kernel_call, serial = plan.kernel_call, plan.serial
    assert kernel_call.entry, "the plan does not enter its kernel directly"
    assert (serial is not None) == (case_id in _SERIAL), serial
    entry = kernel_call.entry

    def spy(*arguments):  # the entry as the plan calls it, the steps last
        seen.append(arguments)
        return entry(*arguments)

    plan.kernel_call.entry = spy
    if serial is not None:
        plan.serial = (_serial_decode if plan.decode else _serial_forward)(plan, spy, kernel_call.steps)
    try:
        later = [(q, k, v),
                 (q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v),  # not C-contiguous: copied
                 tuple(_fresh(s, dtype, rng) for s in (q_shape, kv_shape, kv_shape))]  # fmt: skip
        results = [attnkit.attention(*inputs, sinks=sinks) for inputs in later]
    finally:
        kernel_call.entry, plan.serial = entry, serial
    assert len(seen) == len(later)
    for arguments in seen:
        types = [numba.typeof(value) for value in arguments]
        if plan.decode:  # the decode kernel is compiled for K and V of any layout (a cache read in place too)
            types[1], types[2] = types[1].copy(layout="A"), types[2].copy(layout="A")
        assert kernel_call.kernel.overloads[tuple(types)].entry_point is entry
    tol = 3e-2 if dtype == torch.bfloat16 else 2e-5
    for inputs, out in zip(later, results):
        want = reference(*(_numpy(x).astype(np.float64) for x in inputs),
                         sinks=None if sinks is None else _numpy(sinks).astype(np.float64))  # fmt: skip
        np.testing.assert_allclose(_numpy(out).astype(np.float64), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("array", ["numpy", "torch"])
@pytest.mark.parametrize("kind", ["forward", "decode"])
def test_planned_calls_on_the_calling_thread_from_eight_threads_at_once(kind, array, monkeypatch):
    """Calls that run on the calling thread alone take no lock (no split partials; the plan's packed
    operands, and its spare lse for sdpa's tensor calls, which drop it: the kernel holds the GIL while
    it runs): eight threads calling one plan at once, its kernel entry, steps and scratch shared,
    each get their own answer."""
    from attnkit.kernels import numba_attention

    monkeypatch.setattr(numba_attention, "worker_count", lambda: 1)
    rng = np.random.default_rng(9)
    q_shape, kv_shape = ((1, 4, 24, 32), (1, 4, 24, 32)) if kind == "forward" else ((1, 4, 1, 32), (1, 2, 600, 32))
    dtype = torch.float32 if array == "torch" else np.float32
    inputs = [tuple(_fresh(s, dtype, rng, array) for s in (q_shape, kv_shape, kv_shape)) for _ in range(8)]
    api.clear_plans()
    attnkit.scaled_dot_product_attention(*inputs[0], enable_gqa=True)  # planned
    results = [[] for _ in inputs]

    def work(index):
        for _ in range(40):
            results[index].append(attnkit.scaled_dot_product_attention(*inputs[index], enable_gqa=True))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert planned.count() == 1
    for index, outs in enumerate(results):
        want = reference(*(_numpy(x).astype(np.float64) for x in inputs[index]))
        assert len(outs) == 40
        for out in outs:
            np.testing.assert_allclose(_numpy(out), want, atol=2e-5, rtol=2e-5)
