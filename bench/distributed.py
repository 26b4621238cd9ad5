"""Context parallelism on this machine: ring / Ulysses attention over gloo ranks against one process.

    python -m attnkit.bench.distributed --world 2 [--n 4096 16384 32768] [--method ring] [--layout zigzag]
                                        [--no-causal] [--heads 8] [--head-dim 64] [--rounds 2] [--out FILE.md]

For each sequence length N it runs, each in fresh processes so that peak
memory is the call's own:
- one process with --threads threads (default: all cores) running
  attnkit.attention forward + backward on the whole (1, H, N, D) float32
  sequence;
- --world gloo ranks of one thread each, every rank holding N / P positions,
  running attnkit.distributed's ring (or Ulysses) attention forward + backward.
It reports time per forward + backward (the slowest rank; median of --rounds),
its ratio to one process, peak memory (resident set growth from before the
inputs were made to the end of the step: inputs, outputs, gradients and
temporaries) per rank against one process, and the share of each rank's time
spent blocked on communication (not hidden behind compute). It also tries
torch's own torch.distributed.tensor.experimental.context_parallel on the same
gloo ranks and prints why when it does not run. A markdown table goes to
stdout and, with --out, to a file.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time

from .measure import peak_above, start_peak


def _mib(n_bytes):
    return n_bytes / 2**20


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process(queue, n, heads, d, causal, threads, rounds):
    import numba
    import torch

    import attnkit

    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    attnkit.warmup()
    small = [torch.randn(1, heads, 256, d, requires_grad=True) for _ in range(3)]
    attnkit.attention(*small, causal=causal).sum().backward()  # the kernels' first calls, off the books
    before = start_peak()  # inputs, outputs, gradients and temporaries count; imports and warm-up do not
    q, k, v = (torch.randn(1, heads, n, d, requires_grad=True) for _ in range(3))
    d_out = torch.randn(1, heads, n, d)
    attnkit.attention(q, k, v, causal=causal).backward(d_out)  # warm-up, as the ranks have one
    times = []
    for _ in range(rounds):
        q.grad = k.grad = v.grad = None
        start = time.perf_counter()
        attnkit.attention(q, k, v, causal=causal).backward(d_out)
        times.append(time.perf_counter() - start)
    queue.put(dict(seconds=statistics.median(times), peak_mib=_mib(peak_above(before))))


def rank_process(rank, world, port, queue, n, heads, d, causal, method, layout, rounds):
    import numba
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=datetime.timedelta(seconds=600))
    import attnkit
    from attnkit import distributed

    attnkit.warmup()
    small = [torch.randn(1, heads, 256, d, requires_grad=True) for _ in range(3)]
    fn = distributed.ring_attention if method == "ring" else distributed.ulysses_attention
    fn(*small, causal=causal, layout=layout).sum().backward()  # connections and first calls, off the books
    before = start_peak()
    local = n // world
    q, k, v = (torch.randn(1, heads, local, d, requires_grad=True) for _ in range(3))  # this rank's shard only
    d_out = torch.randn(1, heads, local, d)
    fn(q, k, v, causal=causal, layout=layout).backward(d_out)  # warm-up: connections, first calls
    times, waits = [], []
    for _ in range(rounds):
        q.grad = k.grad = v.grad = None
        dist.barrier()
        distributed.stats["wait_s"] = 0.0
        start = time.perf_counter()
        fn(q, k, v, causal=causal, layout=layout).backward(d_out)
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank does
        times.append(elapsed.item())
        waits.append(distributed.stats["wait_s"] / (time.perf_counter() - start))
    peak = torch.tensor([_mib(peak_above(before))])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    wait_share = torch.tensor([statistics.median(waits)])
    dist.all_reduce(wait_share, op=dist.ReduceOp.MAX)
    if rank == 0:
        queue.put(dict(seconds=statistics.median(times), peak_mib=peak.item(), wait_share=wait_share.item()))
    dist.destroy_process_group()


def torch_context_parallel(rank, world, port, queue):
    """Whether torch's own context_parallel runs on these gloo CPU ranks (a small causal call)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=datetime.timedelta(seconds=120))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel

        mesh = init_device_mesh("cpu", (world,))
        q, k, v = (torch.randn(1, 4, 64 * world, 32) for _ in range(3))
        with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
        verdict = "runs"
    except Exception as error:  # the answer we are after
        verdict = f"does not run: {type(error).__name__}: {error}"
    if rank == 0:
        queue.put(verdict.splitlines()[0][:300])
    dist.destroy_process_group()


def _run(target, nprocs, *args):
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    if nprocs is None:
        process = mp.get_context("spawn").Process(target=target, args=(queue, *args))
        process.start()
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"{target.__name__} exited with {process.exitcode}")
    else:
        mp.start_processes(target, args=(nprocs, _free_port(), queue, *args), nprocs=nprocs, start_method="spawn")
    return queue.get()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.distributed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="gloo ranks, one thread each (default 2)")
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 32768], help="sequence lengths")
    parser.add_argument("--method", choices=("ring", "ulysses"), default="ring")
    parser.add_argument("--layout", choices=("contiguous", "zigzag"), default="zigzag")
    parser.add_argument("--no-causal", dest="causal", action="store_false", help="bidirectional (default causal)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of the one process")
    parser.add_argument("--rounds", type=int, default=2, help="timed steps per setting (median)")
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    if args.world < 2:
        parser.error(f"--world must be at least 2; got {args.world}")
    chunks = args.world * (2 if args.layout == "zigzag" else 1)
    for n in args.n:
        if n % chunks:
            parser.error(f"--n {n} must be a multiple of {chunks} ({args.layout} over {args.world} ranks)")

    title = (f"{args.method} attention, {args.layout}, {'causal' if args.causal else 'bidirectional'}, fp32, "
             f"H{args.heads} D{args.head_dim}: {args.world} gloo ranks x 1 thread against one process x "
             f"{args.threads} threads")
    lines = [f"### {title}", "",
             "| N | one process s | ranks s | ratio (ranks / one) | peak MiB one | peak MiB per rank | "
             "per rank / one | waiting on communication |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for n in args.n:
        print(f"[N={n}] one process", file=sys.stderr, flush=True)
        one = _run(single_process, None, n, args.heads, args.head_dim, args.causal, args.threads, args.rounds)
        print(f"[N={n}] {args.world} ranks", file=sys.stderr, flush=True)
        ranks = _run(rank_process, args.world, n, args.heads, args.head_dim, args.causal, args.method,
                     args.layout, args.rounds)
        line = (f"| {n} | {one['seconds']:.2f} | {ranks['seconds']:.2f} | {ranks['seconds'] / one['seconds']:.2f} | "
                f"{one['peak_mib']:.0f} | {ranks['peak_mib']:.0f} | {ranks['peak_mib'] / one['peak_mib']:.2f} | "
                f"{100 * ranks['wait_share']:.1f}% |")
        lines.append(line)
        print(line, flush=True)
    verdict = _run(torch_context_parallel, args.world)
    lines += ["", f"torch's `context_parallel` on {args.world} gloo CPU ranks: {verdict}"]
    print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
