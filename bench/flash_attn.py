"""attnkit.flash_attn against torch SDPA on packed prefill and on a cache decode step, taking turns.

    python -m attnkit.bench.flash_attn [--rounds 5] [--threads N]

Two cases, the targets of the flash-attn issue:
- prefill: 8 packed sequences (1500, 64, 700, 2048, 300, 1024, 129, 900 tokens;
  H8, D64, fp32, causal) through flash_attn_varlen_func, against torch SDPA
  called once per sequence and torch SDPA on the padded batch with a mask (the
  two ways to do it without varlen); the ratio is against the faster of the two;
- decode: one bf16 step (1 query) for 8 sequences of different lengths (up to
  4096) in one cache, GQA 32/8, D128, through flash_attn_with_kvcache against
  torch SDPA on the padded cache with a length mask; and, in parentheses (not a
  peer), attnkit's own SDPA given the cache as torch gets it, (B, H, N, D): what
  attnkit's decode kernel does when it reads the cache in place.
Contenders alternate `--rounds` times; medians, the ratio torch / attnkit (above
1: attnkit is faster) and each one's largest error against float64 are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from .measure import parse_turns

PREFILL_LENGTHS = (1500, 64, 700, 2048, 300, 1024, 129, 900)
DECODE_LENGTHS = (4096, 3000, 2048, 1500, 1024, 512, 300, 64)


def _take_turns(contenders, rounds):
    """{name: median seconds}, each contender run once per round in turn (after one warm-up call)."""
    for fn in contenders.values():
        fn()
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def prefill_case(rounds):
    import torch
    import torch.nn.functional as F

    from attnkit.flash_attn import flash_attn_varlen_func

    heads, d = 8, 64
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor(PREFILL_LENGTHS)
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    total, longest = int(lengths.sum()), int(lengths.max())
    q, k, v = (torch.randn(total, heads, d, generator=generator) for _ in range(3))  # (total, H, D)
    pieces = [(q[a:b], k[a:b], v[a:b]) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    # torch gets each sequence in its own best layout, (1, H, N, D) contiguous, made before timing.
    heads_first = [tuple(x.transpose(0, 1)[None].contiguous() for x in p) for p in pieces]

    def per_sequence():
        return [F.scaled_dot_product_attention(*p, is_causal=True)[0] for p in heads_first]

    padded = [torch.zeros(len(PREFILL_LENGTHS), heads, longest, d) for _ in range(3)]  # (B, H, N, D)
    for b, piece in enumerate(pieces):
        for dst, src in zip(padded, piece):
            dst[b, :, : src.shape[0]] = src.transpose(0, 1)
    valid = torch.arange(longest)[None, :] < lengths[:, None]  # (B, N)
    causal = torch.ones(longest, longest, dtype=torch.bool).tril()
    mask = (valid[:, None, None, :] & causal[None, None]).contiguous()  # (B, 1, N, N)

    def padded_batch():
        return F.scaled_dot_product_attention(*padded, attn_mask=mask)

    def ours():
        return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True)

    times = _take_turns({"attnkit": ours, "torch per sequence": per_sequence, "torch padded + mask": padded_batch},
                        rounds)
    exact = torch.cat([o.transpose(0, 1) for o in [
        F.scaled_dot_product_attention(*(x.double().transpose(0, 1) for x in p), is_causal=True) for p in pieces]])
    errors = {
        "attnkit": (ours().double() - exact).abs().max().item(),
        "torch per sequence": (torch.cat([o.transpose(0, 1) for o in per_sequence()]).double() - exact).abs().max().item(),
        "torch padded + mask": max(
            (padded_batch()[b, :, : n].transpose(0, 1).double() - exact[a : a + n]).abs().max().item()
            for b, (a, n) in enumerate(zip(cu[:-1].tolist(), PREFILL_LENGTHS))
        ),
    }
    return "packed causal prefill, 8 sequences, H8 D64 fp32", times, errors


def decode_case(rounds):
    import torch
    import torch.nn.functional as F

    import attnkit
    from attnkit.flash_attn import flash_attn_with_kvcache

    hq, hkv, d, capacity = 32, 8, 128, max(DECODE_LENGTHS)
    batch = len(DECODE_LENGTHS)
    generator = torch.Generator().manual_seed(1)
    k_cache, v_cache = (torch.randn(batch, capacity, hkv, d, generator=generator).bfloat16() for _ in range(2))
    q = torch.randn(batch, 1, hq, d, generator=generator).bfloat16()
    lengths = torch.tensor(DECODE_LENGTHS, dtype=torch.int32)

    def ours():
        return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, causal=True)

    # torch gets the cache in its own best layout, (B, H, N, D) contiguous, made before timing.
    q_t, k_t, v_t = (x.transpose(1, 2).contiguous() for x in (q, k_cache, v_cache))
    mask = (torch.arange(capacity)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, N)

    def torch_padded():
        return F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=mask, enable_gqa=True)

    def attnkit_padded():  # not a peer: attnkit's own decode kernel, given the cache as torch is
        return attnkit.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=mask, enable_gqa=True)

    times = _take_turns({"attnkit": ours, "torch padded + mask": torch_padded,
                         "(attnkit sdpa, as torch)": attnkit_padded}, rounds)  # fmt: skip
    exact = F.scaled_dot_product_attention(q_t.double(), k_t.double(), v_t.double(), attn_mask=mask, enable_gqa=True)
    errors = {
        "attnkit": (ours().transpose(1, 2).double() - exact).abs().max().item(),
        "torch padded + mask": (torch_padded().double() - exact).abs().max().item(),
        "(attnkit sdpa, as torch)": (attnkit_padded().double() - exact).abs().max().item(),
    }
    return "bf16 decode step, 8 sequences (64..4096) in one cache, GQA 32/8 D128", times, errors


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.flash_attn", description=__doc__.split("\n\n")[0])
    args = parse_turns(parser, argv)
    for index, run in enumerate((prefill_case, decode_case), 1):
        print(f"[{index}/2] {run.__name__}", file=sys.stderr)
        title, times, errors = run(args.rounds)
        fastest_peer = min(t for name, t in times.items() if name.startswith("torch"))
        print(f"{title}: ratio {fastest_peer / times['attnkit']:.2f} (fastest torch / attnkit)")
        for name, seconds in times.items():
            print(f"  {name:<22} {seconds * 1e3:9.2f} ms   max error {errors[name]:.2g}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
