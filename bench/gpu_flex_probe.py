"""Which outputs of the Triton flex kernels go wrong on a card, per (batch, head).

    PYTHONPATH=. python bench/gpu_flex_probe.py [cuda]

Variants of tests/test_flex.py's test_triton_takes_torch_block_masks_and_captured_scalars (GQA 4/1,
torch BlockMasks of 16-blocks, a score_mod multiplying by a learnable 0-d temperature, a loss on
out and lse), each against dense float64 attention on the CPU with autograd: the max error of out,
lse, dq, dk, dv per (b, h), and the temperature's gradient. On an H200 (2026-12-04, triton 3.6) dq
was wrong (errors ~1) in every variant with the score_mod and right without it, while out, lse, dk,
dv and the temperature's gradient were right (bench/results/gpu.md). Under the Triton interpreter
(TRITON_INTERPRET=1 ... cpu) every error is ~1e-7.
"""

from __future__ import annotations

import sys
import time


def main(dev="cuda"):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    import attnkit

    t0 = time.time()
    g = torch.Generator().manual_seed(13)
    B, HQ, HKV, NQ, NK, D = 2, 4, 1, 37, 53, 16
    q = torch.randn(B, HQ, NQ, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, HKV, NK, D, generator=g, dtype=torch.float64) for _ in range(2))
    temp = torch.tensor(0.7, dtype=torch.float64)
    def per_bh(a, e):
        err = (a.double().cpu() - e.double().cpu()).abs()
        return " ".join(f"{float(err[b, h].max()):.1e}" for b in range(err.shape[0]) for h in range(err.shape[1]))
    for name, mb, mh, use_score, use_lse in [("as test", 2, 4, True, True), ("no lse in loss", 2, 4, True, False),
                                             ("no score_mod", 2, 4, False, True), ("mask B,H None", None, None, True, True),
                                             ("mask B only", 2, None, True, True)]:
        mask_fn = (lambda b, h, qi, kv: (qi + b + h) % 4 != 1) if mh else (lambda b, h, qi, kv: (qi + b + h * 0) % 4 != 1)
        bm = create_block_mask(mask_fn, mb, mh, NQ, NK, device="cpu", BLOCK_SIZE=16)
        res = {}
        for ours, (where, dtype) in enumerate(((dev, torch.float32), ("cpu", torch.float64))):
            ours = ours == 0
            leaves = [x.detach().to(where, dtype).requires_grad_() for x in (q, k, v, temp)]
            sm = (lambda s, b, h, qi, kv, t=leaves[3]: s * t - (qi - kv).abs() * 0.1) if use_score else None
            if ours:
                out, lse = attnkit.flex_attention(*leaves[:3], score_mod=sm, block_mask=bm, enable_gqa=True,
                                                  return_lse=True, backend="triton")
            else:  # dense float64 on the CPU, autograd for every gradient
                kk, vv = (x.repeat_interleave(HQ // HKV, dim=1) for x in leaves[1:3])
                bi = torch.arange(B)[:, None, None, None]
                hi = torch.arange(HQ)[None, :, None, None]
                qi = torch.arange(NQ)[None, None, :, None]
                ki = torch.arange(NK)[None, None, None, :]
                scores = leaves[0] @ kk.transpose(-1, -2) * D ** -0.5
                if use_score:
                    scores = scores * leaves[3] - (qi - ki).abs() * 0.1
                visible = mask_fn(bi, hi, qi, ki).expand(B, HQ, NQ, NK)
                scores = scores.masked_fill(~visible, float("-inf"))
                lse = torch.logsumexp(scores, -1)
                weights = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0)[..., None])
                out = weights @ vv
            loss = out.sum() + ((lse.masked_fill(torch.isinf(lse), 0) * 0.25).sum() if use_lse else 0)
            grads = torch.autograd.grad(loss, leaves[:3] + ([leaves[3]] if use_score else []))
            res[ours] = [out, lse.masked_fill(torch.isinf(lse), 0)] + list(grads)
        print(f"== {name}", flush=True)
        for label, a, e in zip(("out", "lse", "dq", "dk", "dv", "dtemp"), res[True], res[False]):
            if a.dim() == 0:
                print(f"  {label}: {float(a):.6f} vs {float(e):.6f}")
            else:
                print(f"  {label} max err per (b,h): {per_bh(a, e)}")
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cuda")
