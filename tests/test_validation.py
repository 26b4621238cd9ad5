"""Every bad input in design.md's list: the right exception, naming the argument,
what it was given and what it expects."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnkit

Q = np.zeros((2, 4, 5, 8), dtype=np.float32)
K = np.zeros((2, 2, 6, 8), dtype=np.float32)
V = np.zeros((2, 2, 6, 3), dtype=np.float32)


def attend(q=Q, k=K, v=V, **options):
    return attnkit.attention(q, k, v, **options)


BAD_INPUTS = {
    # argument types and array families
    "q_is_a_list": (lambda: attend(q=Q.tolist()), TypeError, r"q must be a numpy.ndarray or a torch.Tensor; got list"),
    "mixed_numpy_and_torch": (lambda: attend(k=torch.from_numpy(K)), TypeError,
                              r"all NumPy arrays or all torch tensors; got q numpy.ndarray, k torch.Tensor"),
    "mixed_devices": (lambda: attnkit.attention(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4, device="meta"),
                                                torch.zeros(1, 2, 3, 4)), ValueError,
                      r"one device; got q on cpu, k on meta"),
    # dtypes
    "integer_q": (lambda: attend(q=Q.astype(np.int64)), TypeError, r"q has dtype int64; expected a floating dtype"),
    "dtype_mismatch": (lambda: attend(v=V.astype(np.float64)), TypeError,
                       r"share one dtype; got q float32, k float32, v float64"),
    "complex_k": (lambda: attend(k=K.astype(np.complex64)), TypeError, r"k has dtype complex64"),
    # shapes
    "one_axis_q": (lambda: attend(q=np.zeros(8, np.float32)), ValueError, r"q has shape \(8,\); expected at least 2 axes"),
    "head_dim_mismatch": (lambda: attend(k=K[..., :4]), ValueError, r"same head dimension D.*q \(2, 4, 5, 8\), k \(2, 2, 6, 4\)"),
    "zero_head_dim": (lambda: attend(q=Q[..., :0], k=K[..., :0]), ValueError, r"head dimension D of at least 1"),
    "key_count_mismatch": (lambda: attend(v=V[:, :, :5]), ValueError, r"same number of keys Nk.*v \(2, 2, 5, 3\)"),
    "kv_head_mismatch": (lambda: attend(v=V[:, :1]), ValueError, r"same number of heads Hkv.*v \(2, 1, 6, 3\)"),
    "heads_do_not_divide": (lambda: attend(k=np.zeros((2, 3, 6, 8), np.float32), v=np.zeros((2, 3, 6, 3), np.float32)),
                            ValueError, r"q has 4 heads and k has 3; expected the query heads to be a whole multiple"),
    "no_kv_heads": (lambda: attend(q=Q[:, :0], k=K[:, :0], v=V[:, :0]), ValueError,
                    r"k has shape \(2, 0, 6, 8\): no heads; expected at least one kv head"),
    "batch_does_not_broadcast": (lambda: attend(k=np.zeros((3, 2, 6, 8), np.float32), v=np.zeros((3, 2, 6, 3), np.float32)),
                                 ValueError, r"leading \(batch\) axes .* do not broadcast"),
    # options
    "nan_scale": (lambda: attend(scale=float("nan")), ValueError, r"scale must be finite; got nan"),
    "inf_scale": (lambda: attend(scale=float("inf")), ValueError, r"scale must be finite; got inf"),
    "string_scale": (lambda: attend(scale="0.1"), TypeError, r"scale must be a real number or None; got str"),
    "unknown_causal": (lambda: attend(causal="lower_right"), ValueError,
                       r"causal must be False, True, 'top_left' or 'bottom_right'; got 'lower_right'"),
    "window_not_a_pair": (lambda: attend(window=5), TypeError, r"window must be a \(left, right\) pair.*got 5"),
    "window_negative": (lambda: attend(window=(-1, 0)), ValueError, r"window left must be >= 0.*got -1"),
    "window_float": (lambda: attend(window=(2.5, 0)), TypeError, r"window left must be a non-negative int or None.*2.5"),
    "softcap_zero": (lambda: attend(softcap=0.0), ValueError, r"softcap must be positive, or None to disable it; got 0.0"),
    "softcap_nan": (lambda: attend(softcap=float("nan")), ValueError, r"softcap must be finite"),
    # masks
    "mask_wrong_shape": (lambda: attend(mask=np.ones((5, 5), bool)), ValueError,
                         r"mask has shape \(5, 5\); expected a shape that broadcasts to \(2, 4, 5, 6\)"),
    "mask_extra_batch_axis": (lambda: attend(mask=np.ones((3, 2, 4, 5, 6), bool)), ValueError, r"mask has shape \(3, 2, 4, 5, 6\)"),
    "mask_integer": (lambda: attend(mask=np.ones((5, 6), np.int32)), TypeError,
                     r"mask has dtype int32; expected bool \(True = may attend\) or a floating dtype"),
    "mask_other_array_type": (lambda: attnkit.attention(*(torch.from_numpy(x) for x in (Q, K, V)), mask=np.ones((5, 6), bool)),
                              TypeError, r"mask must be a torch.Tensor like q; got numpy.ndarray"),
    # backend
    "unknown_backend": (lambda: attend(backend="cuda"), ValueError, r"backend must be one of 'auto', 'reference'.*got 'cuda'"),
    # scaled_dot_product_attention's own arguments
    "sdpa_causal_and_mask": (lambda: attnkit.scaled_dot_product_attention(Q, Q, Q, attn_mask=np.ones((5, 5), bool), is_causal=True),
                             ValueError, r"attn_mask and is_causal=True were both given"),
    "sdpa_heads_without_gqa": (lambda: attnkit.scaled_dot_product_attention(Q, K, V), ValueError,
                               r"query has 4 heads and key has 2; without enable_gqa=True"),
    "sdpa_dropout_out_of_range": (lambda: attnkit.scaled_dot_product_attention(Q, Q, Q, dropout_p=1.5), ValueError,
                                  r"dropout_p must be in \[0, 1\]; got 1.5"),
    "sdpa_dropout_not_a_number": (lambda: attnkit.scaled_dot_product_attention(Q, Q, Q, dropout_p="0.1"), TypeError,
                                  r"dropout_p must be a float in \[0, 1\]; got str"),
    "sdpa_is_causal_not_bool": (lambda: attnkit.scaled_dot_product_attention(Q, Q, Q, is_causal="yes"), TypeError,
                                r"is_causal must be a bool; got str"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_a_clear_error(name):
    call, exception, message = BAD_INPUTS[name]
    with pytest.raises(exception, match=message):
        call()


def test_good_edge_inputs_are_accepted():
    """What looks unusual but is valid must not be refused."""
    attend(scale=-2)  # negative scale
    attend(scale=np.float32(0.5))
    attend(window=(None, 0), causal="bottom_right")
    attend(window=[3, None])
    attend(mask=np.zeros(6, np.float16))  # additive mask of another float dtype, broadcast
    attend(q=Q[:, :, :0])  # Nq = 0
    attnkit.attention(Q[0, 0], K[0, 0], V[0, 0])  # (N, D): one head
