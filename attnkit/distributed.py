"""Context parallelism: attention over a sequence split across processes (torch.distributed).

    from attnkit.distributed import ring_attention, ulysses_attention, shard_sequence, unshard_sequence

Each process (rank) of a group holds a shard of one sequence: q, k and v of
shape (B, H, N_local, D). Two ways to attend across the shards:

- ring_attention: the K/V shards travel around the ring of ranks (isend to the
  next rank, irecv from the previous one, overlapped with the attention on the
  block in hand); each rank merges its partial outputs by their log-sum-exp.
  The backward sends the K/V shards around again, and with them the dK/dV
  accumulated so far, which arrive back at their owner after a full turn.
  Every rank holds its own shard and one block in flight: O(N / P) memory.
- ulysses_attention (DeepSpeed Ulysses): one all-to-all turns sequence shards
  into head shards (each rank: all N positions of H / P heads), attention runs
  locally, a second all-to-all turns the result back. Cheap communication,
  but the head count must divide by P.

Layouts (how the sequence is cut): "contiguous" gives rank r chunk r of P;
"zigzag" cuts 2P chunks and gives rank r chunks r and 2P - 1 - r, so that under
causal attention every rank has the same work (ring-flash-attn's layout):

    positions:  | 0 | 1 | 2 | 3 | 4 | 5 | 6 | 7 |     (P = 4, 2P = 8 chunks)
    zigzag:       r0  r1  r2  r3  r3  r2  r1  r0
    contiguous: |  r0   |  r1   |  r2   |  r3   |

shard_sequence / unshard_sequence cut a full tensor into this rank's shard and
gather the shards back. Backends: gloo between CPU processes (the attention
runs on attnkit's Numba kernel), NCCL between GPUs (the Triton kernel).
Mismatched shapes or options across ranks raise the same ValueError on every
rank; a rank that dies makes the others fail within the group's timeout.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from .api import attention, attention_backward, attention_forward
from .validation import validate_attention

__all__ = ["LAYOUTS", "ring_attention", "shard_sequence", "ulysses_attention", "unshard_sequence"]

LAYOUTS = ("contiguous", "zigzag")

# Message tags of the ring: K/V blocks and the dK/dV that travel with them.
_TAG_KV = 17
_TAG_DKV = 18


def _group_info(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("attnkit.distributed needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group, or torchrun)")
    return dist.get_world_size(group), dist.get_rank(group)


def _global_rank(group, rank):
    return rank if group is None else dist.get_global_rank(group, rank)


def _chunk_ids(layout, rank, world):
    """The chunks of the sequence that rank holds, in the order it holds them."""
    return [rank] if layout == "contiguous" else [rank, 2 * world - 1 - rank]


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")


def shard_sequence(x, *, layout="contiguous", group=None, dim=-2):
    """This rank's shard of the full tensor x along `dim` (default -2: (B, H, N, D)'s N).

    contiguous: chunk r of P; zigzag: chunks r and 2P - 1 - r of 2P, concatenated.
    N must divide by P (contiguous) or 2P (zigzag).
    """
    _check_layout(layout)
    world, rank = _group_info(group)
    ids = _chunk_ids(layout, rank, world)
    n_chunks = world * len(ids)
    n = x.shape[dim]
    if n % n_chunks:
        raise ValueError(f"the sequence axis (dim {dim}) has {n} positions; layout {layout!r} over {world} ranks "
                         f"cuts it into {n_chunks} equal chunks, so it must be a multiple of {n_chunks}")
    chunks = x.chunk(n_chunks, dim)
    return torch.cat([chunks[i] for i in ids], dim).contiguous()


def unshard_sequence(x_local, *, layout="contiguous", group=None, dim=-2):
    """The full tensor from every rank's shard (the inverse of shard_sequence), on every rank."""
    _check_layout(layout)
    world, _ = _group_info(group)
    gathered = [torch.empty_like(x_local) for _ in range(world)]
    dist.all_gather(gathered, x_local.contiguous(), group=group)
    return _in_sequence_order(gathered, layout, world, dim)


def _in_sequence_order(shards, layout, world, dim):
    """Shards (one per rank, in rank order) put back in sequence order along dim."""
    ordered = [None] * (world * (2 if layout == "zigzag" else 1))
    for rank, shard in enumerate(shards):
        ids = _chunk_ids(layout, rank, world)
        for chunk_id, piece in zip(ids, shard.chunk(len(ids), dim)):
            ordered[chunk_id] = piece
    return torch.cat(ordered, dim)


def _agree(group, what):
    """Raise the same ValueError on every rank unless every rank passed the same `what`."""
    world, _ = _group_info(group)
    everyone = [None] * world
    dist.all_gather_object(everyone, what, group=group)
    if any(x != everyone[0] for x in everyone):
        described = "; ".join(f"rank {r}: {x}" for r, x in enumerate(everyone))
        raise ValueError(f"the ranks called with different shapes or options: {described}")


def _validate(q, k, v, causal, scale, layout, group, need_even):
    _check_layout(layout)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be this rank's (B, H, N_local, D) torch tensor; got "
                             f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
    world, _ = _group_info(group)
    summary = dict(q=tuple(q.shape), k=tuple(k.shape), v=tuple(v.shape), dtype=str(q.dtype), causal=causal,
                   scale=scale, layout=layout)
    _agree(group, summary)  # every rank raises the same error, or none does
    if q.shape[2] != k.shape[2] or k.shape[2] != v.shape[2]:
        raise ValueError(f"q, k and v must hold the same shard of one sequence: N_local {q.shape[2]}, "
                         f"{k.shape[2]}, {v.shape[2]}")
    # Types, dtypes, devices, heads and head dims: attention()'s own checks (the same on every rank now).
    validate_attention(q, k, v, causal=causal, mask=None, scale=scale, window=None, softcap=None)
    if need_even and layout == "zigzag" and q.shape[2] % 2:
        raise ValueError(f"layout 'zigzag' gives each rank two equal chunks: N_local must be even; "
                         f"got {q.shape[2]}")
    return world


# ---------------------------------------------------------------------------
# Ring attention
# ---------------------------------------------------------------------------


def _visibility(q_chunk, k_chunk, causal):
    """How query chunk q_chunk sees key chunk k_chunk (equal-sized chunks of one sequence):
    False (not at all), "all" or "causal" (the diagonal block)."""
    if not causal or k_chunk < q_chunk:
        return "all"
    return "causal" if k_chunk == q_chunk else False


def _block_pairs(layout, rank, source, world, causal):
    """[(query piece, key piece, visibility)] of this rank's queries against source's K/V block.

    Causal calls cut each shard into its chunks (pieces); a bidirectional call
    takes the whole shard against the whole block, one piece each."""
    if not causal:
        return [(0, 0, "all")]
    q_ids, k_ids = _chunk_ids(layout, rank, world), _chunk_ids(layout, source, world)
    pairs = []
    for qi, q_chunk in enumerate(q_ids):
        for ki, k_chunk in enumerate(k_ids):
            seen = _visibility(q_chunk, k_chunk, causal)
            if seen:
                pairs.append((qi, ki, seen))
    return pairs


def _pieces(x, n_pieces):
    """x (B, H, N_local, X) as n_pieces contiguous (B, H, N_local / n, X) tensors (no copy for one)."""
    return [x.contiguous()] if n_pieces == 1 else [p.contiguous() for p in x.chunk(n_pieces, dim=2)]


def _accumulation_dtype(dtype):
    """What the ring merges and accumulates in: float32, float64 for float64 inputs (which attention()
    computes in float64 throughout; the ring's float32 sums left them float32-accurate)."""
    return torch.promote_types(dtype, torch.float32)


def _merge(out, lse, part_out, part_lse):
    """Running (out, lse) with one more normalised partial: weights exp(lse_i - lse), in place;
    in float32 (float64 for float64 inputs)."""
    accumulate = _accumulation_dtype(part_out.dtype)
    part_out, part_lse = part_out.to(accumulate), part_lse.to(accumulate)
    if out is None:
        return part_out, part_lse  # the kernel's own fresh tensors: safe to update in place
    new = torch.logaddexp(lse, part_lse)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)  # rows no block reached stay 0
    out.mul_(torch.exp(lse - safe)[..., None]).addcmul_(part_out, torch.exp(part_lse - safe)[..., None])
    return out, new


# Seconds this process has spent blocked on ring and all-to-all transfers (the
# benchmark reads and resets it: communication not hidden behind compute).
stats = {"wait_s": 0.0}


class _Ring:
    """Sends to the next rank and receives from the previous one, asynchronously."""

    def __init__(self, group, world, rank):
        self.group = group
        self.next = _global_rank(group, (rank + 1) % world)
        self.prev = _global_rank(group, (rank - 1) % world)

    def shift(self, tensor, tag):
        """Start sending `tensor` on and receiving the previous rank's; returns wait(), which
        blocks until both are done and returns the received tensor."""
        received = torch.empty_like(tensor)
        sends = dist.isend(tensor, self.next, group=self.group, tag=tag)
        receives = dist.irecv(received, self.prev, group=self.group, tag=tag)

        def wait():
            started = time.perf_counter()
            receives.wait()
            sends.wait()
            stats["wait_s"] += time.perf_counter() - started
            return received

        return wait


class _Block:
    """A K/V block as one flat buffer, piece by piece (k_0, v_0, k_1, v_1, ...), so that it
    travels in one message and every piece is a contiguous view for the kernels."""

    def __init__(self, k, v, n_pieces):
        b, h, n_local = k.shape[:3]
        self.shapes = [(b, h, n_local // n_pieces, x.shape[3]) for x in (k, v)]  # one piece of k, of v
        self.n_pieces = n_pieces

    def pack(self, k, v):
        """k and v in one new buffer, copied once, piece by piece."""
        buffer = torch.empty(k.numel() + v.numel(), dtype=k.dtype, device=k.device)
        for (k_piece, v_piece), k_part, v_part in zip(self.unpack(buffer), k.chunk(self.n_pieces, dim=2),
                                                      v.chunk(self.n_pieces, dim=2)):
            k_piece.copy_(k_part)
            v_piece.copy_(v_part)
        return buffer

    def unpack(self, buffer):
        """[(k_i, v_i)] views of buffer."""
        pieces, start = [], 0
        for _ in range(self.n_pieces):
            pair = []
            for shape in self.shapes:
                size = math.prod(shape)
                pair.append(buffer[start : start + size].view(shape))
                start += size
            pieces.append(tuple(pair))
        return pieces

    def whole(self, buffer):
        """(k, v) (B, H, N_local, X) from a buffer of pieces."""
        pieces = self.unpack(buffer)
        return tuple(torch.cat([p[i] for p in pieces], dim=2) for i in range(2))


def _ring_forward(q, k, v, causal, scale, layout, group):
    """(out in q's dtype, lse float32 (float64 for float64 q)) of this rank's queries against every
    rank's keys."""
    world, rank = _group_info(group)
    ring = _Ring(group, world, rank)
    n_pieces = len(_chunk_ids(layout, rank, world)) if causal else 1
    q_pieces = _pieces(q, n_pieces)
    layout_of = _Block(k, v, n_pieces)
    block = layout_of.pack(k, v)
    outs, lses = [None] * n_pieces, [None] * n_pieces
    for step in range(world):
        source = (rank - step) % world
        wait = ring.shift(block, _TAG_KV) if step < world - 1 else None  # the next block, while computing
        kv = layout_of.unpack(block)
        for qi, ki, seen in _block_pairs(layout, rank, source, world, causal):
            part_out, part_lse = attention_forward(q_pieces[qi], *kv[ki], causal=seen == "causal", scale=scale)
            outs[qi], lses[qi] = _merge(outs[qi], lses[qi], part_out, part_lse)
        if wait is not None:
            block = wait()
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2)


def _ring_backward(q, k, v, out, lse, d_out, causal, scale, layout, group):
    """(dq, dk, dv) of _ring_forward: K/V go round again, dK/dV accumulate as they travel."""
    world, rank = _group_info(group)
    ring = _Ring(group, world, rank)
    n_pieces = len(_chunk_ids(layout, rank, world)) if causal else 1
    q_pieces, out_pieces, d_out_pieces, lse_pieces = (
        _pieces(x, n_pieces) for x in (q, out, d_out, lse[..., None]))
    lse_pieces = [x[..., 0] for x in lse_pieces]
    accumulate = _accumulation_dtype(q.dtype)
    dq_pieces = [torch.zeros(p.shape, dtype=accumulate, device=q.device) for p in q_pieces]
    layout_of = _Block(k, v, n_pieces)
    block = layout_of.pack(k, v)
    incoming = None  # dK/dV accumulated for the block in hand by the ranks it visited before
    for step in range(world):
        source = (rank - step) % world
        wait_kv = ring.shift(block, _TAG_KV) if step < world - 1 else None
        kv = layout_of.unpack(block)
        accumulated = torch.zeros(block.numel(), dtype=accumulate, device=block.device)  # its dK/dV, by piece
        grads_of = layout_of.unpack(accumulated)
        for qi, ki, seen in _block_pairs(layout, rank, source, world, causal):
            dq_part, dk_part, dv_part = attention_backward(
                q_pieces[qi], *kv[ki], out_pieces[qi], d_out_pieces[qi], lse_pieces[qi],
                causal=seen == "causal", scale=scale,
            )  # fmt: skip
            dq_pieces[qi].add_(dq_part)
            grads_of[ki][0].add_(dk_part)
            grads_of[ki][1].add_(dv_part)
        if incoming is not None:
            accumulated.add_(incoming())  # received while this block's gradients were computed
        incoming = ring.shift(accumulated, _TAG_DKV)  # on to the next rank (the owner, after the last step)
        if wait_kv is not None:
            block = wait_kv()
    dk, dv = layout_of.whole(incoming())  # this rank's own block, back from its full turn
    return torch.cat(dq_pieces, dim=2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, layout, group):
        out, lse = _ring_forward(q, k, v, causal, scale, layout, group)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (causal, scale, layout, group)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, unused_d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(q, k, v, out, lse, d_out.contiguous(), *ctx.options)
        return dq, dk, dv, None, None, None, None


def ring_attention(q, k, v, *, causal=False, scale=None, layout="contiguous", group=None, return_lse=False):
    """Exact attention over a sequence sharded across the ranks of `group`, by ring attention.

    Args:
        q: (B, Hq, N_local, D) this rank's queries (its shard of the sequence,
            as shard_sequence cuts it).
        k, v: (B, Hkv, N_local, D) / (B, Hkv, N_local, Dv) this rank's keys and
            values; Hq a multiple of Hkv (GQA).
        causal: top-left causal over the whole sequence (position order, not
            shard order).
        scale: factor on q.k (default 1/sqrt(D)).
        layout: "contiguous" or "zigzag" (see the module docstring); every
            rank must use the same one, and have cut with it.
        group: the process group (default: the world).
        return_lse: also return lse (B, Hq, N_local), float32 (float64 for
            float64 q, which the ring also merges and accumulates in).

    Returns:
        out (B, Hq, N_local, Dv) in q's dtype (and lse): this rank's rows of
        attention over the full sequence. Differentiable (torch autograd).
    """
    _validate(q, k, v, causal, scale, layout, group, need_even=True)
    out, lse = _RingAttention.apply(q, k, v, bool(causal), scale, layout, group)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------
# Ulysses: sequence shards <-> head shards
# ---------------------------------------------------------------------------


def _all_to_all(x, group, world):
    """(P, ...) -> (P, ...): slice j goes to rank j, slice j of the result came from rank j."""
    x = x.contiguous()
    received = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous (empty_like keeps strides)
    started = time.perf_counter()
    dist.all_to_all_single(received, x, group=group)
    stats["wait_s"] += time.perf_counter() - started
    return received


class _SeqToHeads(torch.autograd.Function):
    """(B, H, N_local, D) sequence shards -> (B, H / P, N, D) head shards, in sequence order."""

    @staticmethod
    def forward(ctx, x, layout, group, world):
        ctx.options = (layout, group, world)
        b, h, n_local, d = x.shape
        sent = x.reshape(b, world, h // world, n_local, d).transpose(0, 1)  # (P, B, H/P, Nl, D)
        received = _all_to_all(sent, group, world)  # slice j: rank j's positions of my heads
        return _in_sequence_order(list(received.unbind(0)), layout, world, dim=2)

    @staticmethod
    def backward(ctx, grad):
        return _HeadsToSeq.apply(grad, *ctx.options), None, None, None


class _HeadsToSeq(torch.autograd.Function):
    """The inverse: (B, H / P, N, D) head shards -> (B, H, N_local, D) sequence shards."""

    @staticmethod
    def forward(ctx, x, layout, group, world):
        ctx.options = (layout, group, world)
        n_chunks = world * (2 if layout == "zigzag" else 1)
        chunks = x.chunk(n_chunks, dim=2)
        per_rank = [torch.cat([chunks[i] for i in _chunk_ids(layout, r, world)], dim=2) for r in range(world)]
        received = _all_to_all(torch.stack(per_rank), group, world)  # slice j: my positions of rank j's heads
        return torch.cat(list(received.unbind(0)), dim=1)

    @staticmethod
    def backward(ctx, grad):
        return _SeqToHeads.apply(grad, *ctx.options), None, None, None


def ulysses_attention(q, k, v, *, causal=False, scale=None, layout="contiguous", group=None, return_lse=False):
    """ring_attention's contract, computed by DeepSpeed Ulysses' all-to-all over heads.

    Hq must divide by the group's size P (each rank attends over the whole
    sequence for Hq / P heads); kv heads that do not divide by P are repeated
    up to Hq first. The local attention runs on attnkit's fastest backend.
    """
    world = _validate(q, k, v, causal, scale, layout, group, need_even=True)
    if q.shape[1] % world:
        raise ValueError(f"Ulysses splits the {q.shape[1]} query heads over {world} ranks: the head count must "
                         f"divide by the number of ranks (or use ring_attention)")
    if k.shape[1] % world:
        group_size = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group_size, dim=1), v.repeat_interleave(group_size, dim=1)
    q_h, k_h, v_h = (_SeqToHeads.apply(x, layout, group, world) for x in (q, k, v))
    out, lse = attention(q_h, k_h, v_h, causal=bool(causal), scale=scale, return_lse=True)
    out = _HeadsToSeq.apply(out, layout, group, world)
    if not return_lse:
        return out
    lse = _HeadsToSeq.apply(lse.detach()[..., None], layout, group, world)[..., 0]
    return out, lse
