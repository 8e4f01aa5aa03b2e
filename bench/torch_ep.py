#!/usr/bin/env python3
"""Time a PyTorch expert-parallel MoE layer, the peer of `moe-ep bench`.

Usage:
    /usr/bin/python3 bench/torch_ep.py [--ranks R] [--tokens T | --tokens-per-rank N[,N...]]
        [--hidden H] [--ffn F] [--experts E] [--top-k K] [--threads N]
        [--warmup N] [--repeats N] [--seed S] [--timeout SECONDS] [--check]

The script spawns R rank processes. As in moe-ep, each rank owns a contiguous
block of the T tokens and a contiguous block of the E experts, and the first
T mod R ranks get one more token (likewise for experts). Each rank runs the
four steps of moe-ep's forward with torch on the CPU:

1. route: gate logits x . gate^T, softmax over all E experts, top-K, and the K
   weights divided by their sum (Mixtral's router);
2. dispatch: the per-expert row counts go to every expert's owner with
   torch.distributed.all_to_all_single, then the (token, expert) rows with a
   second all_to_all_single whose split sizes come from those counts;
3. compute: each owned expert runs its SwiGLU FFN, (silu(x W1) * (x W3)) W2,
   on all of its rows at once, from every source rank;
4. combine: a third all_to_all_single returns the rows, and each token sums its
   K outputs times its routing weights.

Each rank runs --threads threads: torch.set_num_threads, and OPENBLAS_NUM_THREADS
for the OpenBLAS that Debian's torch calls for float32 matmuls.

The process group uses the gloo backend. Its rendezvous is a file store in a
private temporary directory, because the TCP store of Debian 12's torch 1.13.1
listened on every interface when given 127.0.0.1 (seen with ss -tln).
GLOO_SOCKET_IFNAME=lo keeps the sockets that gloo opens between the ranks on
the loopback interface.

Each case runs --warmup forwards, then --repeats forwards, each after a barrier.
A forward's time is the max over the ranks of the rank's time from the barrier
to the end of its combine. For each case the script prints one JSON line on
stdout with the shape, the threads per rank, forward_ms_best and
forward_ms_median, and the step times of the best forward (max over ranks).
Every case asserts that each rank's output has shape (T_r, H) and is finite,
and that the ranks received T x K rows in all. With --check, each rank also
compares its output with a float64 computation from every expert's weights,
without the exchanges.

Exit status: 0 when every case ran, 2 on invalid usage, 3 when torch cannot be
imported, a rank failed, or a wait passed --timeout. The script kills its
ranks before it exits with 3.

It needs Debian's python3-torch (1.13) with gloo, under /usr/bin/python3.
"""

import argparse
import ctypes
import json
import math
import os
import queue
import shutil
import signal
import sys
import tempfile
import time
import traceback
from datetime import timedelta

EXIT_USAGE = 2
EXIT_RUNTIME = 3

# Largest difference that --check accepts between the float32 output and the
# float64 computation, as a fraction of the largest output. The difference
# measured about 1.5e-6 at H = F = 1024 and at H = F = 4096, with outputs of
# order 1, whereas a row sent to the wrong expert or token is off by order 1.
CHECK_TOLERANCE = 1e-3

# Largest --ranks, the same as moe-ep's.
MAX_RANKS = 64

# Seconds that the ranks get to exit after SIGTERM, before SIGKILL.
GRACE_SECONDS = 5.0


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an integer >= 1")
    return value


def count_list(text):
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected integers >= 1 separated by commas")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected integers >= 1 separated by commas")
    return values


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Time a PyTorch expert-parallel MoE layer on gloo; prints one JSON line per case.")
    parser.add_argument("--ranks", type=positive_int, default=2, help=f"rank processes, at most {MAX_RANKS} [2]")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--tokens", type=positive_int, default=4096, help="tokens in the whole batch [4096]")
    batch.add_argument("--tokens-per-rank", type=count_list, default=None,
                       help="decode cases instead of --tokens: a comma-separated list of tokens per rank, "
                            "one case each, e.g. 1,4,8")
    parser.add_argument("--hidden", type=positive_int, default=1024, help="hidden size H [1024]")
    parser.add_argument("--ffn", type=positive_int, default=1024, help="expert FFN size F [1024]")
    parser.add_argument("--experts", type=positive_int, default=16, help="experts E [16]")
    parser.add_argument("--top-k", type=positive_int, default=2, help="experts per token K, at most E [2]")

    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads per rank [the online cores divided by R, at least 1]")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards per case [1]")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed forwards per case [5]")
    parser.add_argument("--seed", type=int, default=1, help="seed of the weights and tokens [1]")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds for the whole run, and for any one collective [300]")
    parser.add_argument("--check", action="store_true",
                        help="also compare every output with a float64 computation without the exchanges")
    args = parser.parse_args(argv)

    if args.ranks > MAX_RANKS:
        parser.error(f"invalid --ranks value {args.ranks}: expected at most {MAX_RANKS}")
    if args.top_k > args.experts:
        parser.error(f"invalid --top-k value {args.top_k}: it exceeds --experts {args.experts}")
    if args.warmup < 0:
        parser.error(f"invalid --warmup value {args.warmup}: expected an integer >= 0")
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        parser.error(f"invalid --timeout value {args.timeout}: expected a positive number of seconds")
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.ranks)
    return args


def block_range(count, parts, index):
    """Return (first, size) of block `index` when `count` items are split into
    `parts` contiguous blocks, the first count mod parts blocks one larger."""
    base, extra = divmod(count, parts)
    first = index * base + min(index, extra)
    return first, base + (1 if index < extra else 0)


# ---- the layer ---------------------------------------------------------------


class Layer:
    """One rank's part of the layer, in float32.

    gate_t is (H, E), the router weight transposed. w1[j] and w3[j] are (H, F)
    and w2[j] is (F, H), for the j-th expert that this rank owns, whose global
    index is first_expert + j. Every tensor is drawn from its own seeded
    generator, so it has the same values on any rank count.
    """

    def __init__(self, torch, args, rank):
        H, E = args.hidden, args.experts
        self.first_expert, self.local_experts = block_range(E, args.ranks, rank)
        self.gate_t = normal(torch, (E, H), args.seed, 0, 1.0 / math.sqrt(H)).t().contiguous()
        self.w1, self.w3, self.w2 = [], [], []
        for e in range(self.first_expert, self.first_expert + self.local_experts):
            w1, w3, w2 = expert_weights(torch, args, e)
            self.w1.append(w1)
            self.w3.append(w3)
            self.w2.append(w2)


def normal(torch, shape, seed, stream, scale):
    """Draw a float32 tensor of N(0, scale^2) values from the generator of (seed, stream)."""
    generator = torch.Generator()
    generator.manual_seed(seed * 1_000_003 + stream)
    return torch.randn(shape, generator=generator, dtype=torch.float32) * scale


def expert_weights(torch, args, e):
    """Return (W1, W3, W2) of expert e: (H, F), (H, F) and (F, H)."""
    H, F = args.hidden, args.ffn
    stream = 1 + 3 * e
    return (normal(torch, (H, F), args.seed, stream, 1.0 / math.sqrt(H)),
            normal(torch, (H, F), args.seed, stream + 1, 1.0 / math.sqrt(H)),
            normal(torch, (F, H), args.seed, stream + 2, 1.0 / math.sqrt(F)))


def token_block(torch, args, tokens, rank):
    """Return this rank's (T_r, H) block of the batch of `tokens` tokens."""
    first, count = block_range(tokens, args.ranks, rank)
    stream = 1 + 3 * args.experts + tokens  # one batch per token count
    every = normal(torch, (tokens, args.hidden), args.seed, stream, 1.0)
    return every[first:first + count].contiguous()


def route(torch, layer, x, top_k):
    """Step 1. Return (ids, weights), each (T_r, K): the experts of each token
    in order of decreasing probability, and their weights summing to 1."""
    probs = torch.softmax(x @ layer.gate_t, dim=1)
    weights, ids = torch.topk(probs, top_k, dim=1)
    return ids, weights / weights.sum(dim=1, keepdim=True)


def forward(torch, dist, args, layer, x):
    """Run one forward on this rank. Return the (T_r, H) output, the step times
    in seconds (route, dispatch, compute, combine) and the rows received."""
    R, E, K, H = args.ranks, args.experts, args.top_k, args.hidden
    start = time.perf_counter()
    ids, weights = route(torch, layer, x, K)
    routed = time.perf_counter()

    # Step 2, dispatch. The K x T_r assignments sorted by expert are also
    # grouped by owner rank, because each rank owns a contiguous block.
    flat_ids = ids.reshape(-1)
    order = torch.sort(flat_ids, stable=True).indices
    per_expert = torch.bincount(flat_ids, minlength=E)
    expert_splits = [block_range(E, R, d)[1] for d in range(R)]
    send_splits = [int(part.sum()) for part in torch.split(per_expert, expert_splits)]

    # Split sizes first: rank d receives, from every rank, the counts of d's experts.
    received_counts = torch.empty(R * layer.local_experts, dtype=per_expert.dtype)
    dist.all_to_all_single(received_counts, per_expert,
                           output_split_sizes=[layer.local_experts] * R,
                           input_split_sizes=expert_splits)
    counts = received_counts.reshape(R, layer.local_experts)  # (source, local expert)
    recv_splits = [int(n) for n in counts.sum(dim=1)]

    send_rows = x.index_select(0, order // K)
    recv_rows = torch.empty(sum(recv_splits), H, dtype=x.dtype)
    dist.all_to_all_single(recv_rows, send_rows, output_split_sizes=recv_splits,
                           input_split_sizes=send_splits)
    dispatched = time.perf_counter()

    # Step 3, compute. The rows arrive grouped by source and then by expert;
    # each expert gathers its rows from every source and runs once on all of them.
    expert_major = expert_major_order(torch, counts, recv_splits)
    rows = recv_rows.index_select(0, expert_major)
    out_rows = torch.empty_like(rows)
    first = 0
    for j, n in enumerate(counts.sum(dim=0).tolist()):
        block = rows[first:first + n]
        gate = block @ layer.w1[j]
        hidden = torch.nn.functional.silu(gate) * (block @ layer.w3[j])
        out_rows[first:first + n] = hidden @ layer.w2[j]
        first += n
    back_to_source = torch.empty_like(out_rows)
    back_to_source[expert_major] = out_rows
    computed = time.perf_counter()

    # Step 4, combine: the rows return in the order they were sent.
    returned = torch.empty_like(send_rows)
    dist.all_to_all_single(returned, back_to_source, output_split_sizes=send_splits,
                           input_split_sizes=recv_splits)
    scaled = returned * weights.reshape(-1).index_select(0, order).unsqueeze(1)
    out = torch.zeros_like(x).index_add_(0, order // K, scaled)
    combined = time.perf_counter()
    steps = (routed - start, dispatched - routed, computed - dispatched, combined - computed)
    return out, steps, recv_rows.shape[0]


def expert_major_order(torch, counts, recv_splits):
    """Return the indices that reorder rows grouped (source, expert) into rows
    grouped (expert, source). counts is (R, L), the rows from each source for
    each of this rank's L experts."""
    source_first = [0]
    for n in recv_splits[:-1]:
        source_first.append(source_first[-1] + n)
    starts = counts.cumsum(dim=1) - counts  # row of (s, j) within source s's block
    pieces = []
    R, L = counts.shape
    for j in range(L):
        for s in range(R):
            first = source_first[s] + int(starts[s, j])
            pieces.append(torch.arange(first, first + int(counts[s, j])))
    if not pieces:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat(pieces)


def reference_output(torch, args, x, ids, weights):
    """Return the (T_r, H) output in float64 from every expert's weights, for
    the experts and weights that the router chose in float32."""
    x64 = x.double()
    out = torch.zeros_like(x64)
    for e in torch.unique(ids).tolist():
        w1, w3, w2 = (w.double() for w in expert_weights(torch, args, e))
        token, slot = (ids == e).nonzero(as_tuple=True)
        rows = x64[token]
        y = (torch.nn.functional.silu(rows @ w1) * (rows @ w3)) @ w2
        out.index_add_(0, token, y * weights[token, slot].double().unsqueeze(1))
    return out


# ---- one rank ----------------------------------------------------------------


def die_with_parent(parent_pid):
    """Ask Linux to kill this process when its parent exits (PR_SET_PDEATHSIG),
    so that no rank outlives a script that was killed."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 is PR_SET_PDEATHSIG in <linux/prctl.h>
    except (OSError, AttributeError):
        pass  # not Linux: the gloo timeout still ends an orphaned rank
    if os.getppid() != parent_pid:
        os._exit(EXIT_RUNTIME)


def run_rank(rank, args, store_path, parent_pid, messages):
    """Entry point of rank `rank`. Sends ("case", dict) from rank 0 for each
    case, then ("done", rank), or ("error", rank, text) on any failure."""
    die_with_parent(parent_pid)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(args.threads)
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                world_size=args.ranks, timeout=timedelta(seconds=args.timeout))
        layer = Layer(torch, args, rank)
        for tokens in case_tokens(args):
            result = run_case(torch, dist, args, layer, rank, tokens)
            if rank == 0:
                messages.put(("case", result))
        dist.barrier()
        dist.destroy_process_group()
        messages.put(("done", rank))
    except BaseException:  # reported to the parent, which kills every rank
        messages.put(("error", rank, traceback.format_exc(limit=4).strip()))
        sys.exit(EXIT_RUNTIME)


def case_tokens(args):
    """Return the batch size of each case: --tokens, or R x each --tokens-per-rank."""
    if args.tokens_per_rank:
        return [args.ranks * n for n in args.tokens_per_rank]
    return [args.tokens]


def run_case(torch, dist, args, layer, rank, tokens):
    """Time one case on this rank, and return the case's JSON fields (on every rank)."""
    x = token_block(torch, args, tokens, rank)
    for _ in range(args.warmup):
        forward(torch, dist, args, layer, x)
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        start = time.perf_counter()
        out, steps, received = forward(torch, dist, args, layer, x)
        times.append([time.perf_counter() - start, *steps])

    # Max over the ranks, per forward and per column.
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    check = check_output(torch, dist, args, layer, x, out, received, tokens)

    totals = slowest[:, 0]
    best = int(torch.argmin(totals))
    result = {
        "ranks": args.ranks,
        "tokens": tokens,
        "tokens_per_rank": block_range(tokens, args.ranks, 0)[1],
        "hidden": args.hidden,
        "ffn": args.ffn,
        "experts": args.experts,
        "top_k": args.top_k,
        "threads": args.threads,
        "repeats": args.repeats,
        "forward_ms_best": 1e3 * float(totals[best]),
        "forward_ms_median": 1e3 * float(torch.median(totals)),
        "step_ms_of_best": {name: 1e3 * float(slowest[best, 1 + i])
                            for i, name in enumerate(("route", "dispatch", "compute", "combine"))},
        "torch": torch.__version__,
        "backend": "gloo",
    }
    if check is not None:
        result["check_max_abs_diff"] = check
    return result


def check_output(torch, dist, args, layer, x, out, received, tokens):
    """Raise when this rank's output is not (T_r, H) and finite, or when the
    ranks received other than T x K rows in all. With --check, also compare
    with reference_output and return the max abs difference over the ranks."""
    if tuple(out.shape) != tuple(x.shape):
        raise RuntimeError(f"output shape {tuple(out.shape)}, expected {tuple(x.shape)}")
    if not bool(torch.isfinite(out).all()):
        raise RuntimeError("the output has NaN or Inf values")
    total = torch.tensor([received], dtype=torch.int64)
    dist.all_reduce(total)
    if int(total) != tokens * args.top_k:
        raise RuntimeError(f"the ranks received {int(total)} rows, expected T x K = {tokens * args.top_k}")
    if not args.check:
        return None
    ids, weights = route(torch, layer, x, args.top_k)
    expected = reference_output(torch, args, x, ids, weights)
    diff = torch.tensor([float((out.double() - expected).abs().max()) if out.numel() else 0.0])
    scale = torch.tensor([float(expected.abs().max()) if out.numel() else 0.0])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    dist.all_reduce(scale, op=dist.ReduceOp.MAX)
    if not float(diff) <= CHECK_TOLERANCE * float(scale):
        raise RuntimeError(f"the output differs from the float64 reference by {float(diff):.3g}, "
                           f"more than {CHECK_TOLERANCE:g} x the largest output {float(scale):.3g}")
    return float(diff)


# ---- the parent ----------------------------------------------------------------


def stop_ranks(ranks):
    """Terminate the ranks, wait up to GRACE_SECONDS, then kill what is left."""
    for p in ranks:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + GRACE_SECONDS
    for p in ranks:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(GRACE_SECONDS)


def run(args):
    """Spawn the ranks, print each case's line, and return the exit status."""
    import multiprocessing

    # Inherited by the spawned ranks. Debian's torch calls OpenBLAS for
    # float32 matmuls, and OpenBLAS takes its thread count from the
    # environment when it loads, not from torch.set_num_threads.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    store_dir = tempfile.mkdtemp(prefix="torch_ep-")
    try:
        store_path = os.path.join(store_dir, "store")
        ranks = [context.Process(target=run_rank, args=(r, args, store_path, os.getpid(), messages))
                 for r in range(args.ranks)]
        for p in ranks:
            p.start()
        return wait_ranks(args, ranks, messages)
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)


def wait_ranks(args, ranks, messages):
    """Print each case's line as rank 0 sends it, and return the exit status
    once every rank is done, or after stopping them on a failure."""
    deadline = time.monotonic() + args.timeout
    done = set()
    while len(done) < args.ranks:
        failure = wait_failure(args, ranks, done, deadline)
        if failure:
            print(f"torch_ep.py: {failure}; stopped the ranks", file=sys.stderr)
            stop_ranks(ranks)
            print_errors(messages)
            return EXIT_RUNTIME
        try:
            message = messages.get(timeout=1.0)
        except queue.Empty:
            continue
        if message[0] == "case":
            print(json.dumps(message[1]), flush=True)
        elif message[0] == "done":
            done.add(message[1])
        else:
            print(f"torch_ep.py: rank {message[1]} failed:\n{message[2]}", file=sys.stderr)
            stop_ranks(ranks)
            return EXIT_RUNTIME

    for p in ranks:
        p.join(max(0.0, deadline - time.monotonic()) + GRACE_SECONDS)
    bad = [f"rank {r} exit code {p.exitcode}" for r, p in enumerate(ranks) if p.exitcode != 0]
    if bad:
        print(f"torch_ep.py: {', '.join(bad)} after the last case; stopped the ranks", file=sys.stderr)
        stop_ranks(ranks)
        return EXIT_RUNTIME
    return 0


def print_errors(messages):
    """Print the "error" messages that are still in the queue."""
    while True:
        try:
            message = messages.get(timeout=0.5)
        except queue.Empty:
            return
        if message[0] == "error":
            print(f"torch_ep.py: rank {message[1]} failed:\n{message[2]}", file=sys.stderr)


def wait_failure(args, ranks, done, deadline):
    """Return why waiting for the ranks must stop, or None: the deadline has
    passed, or a rank exited before it reported "done"."""
    if time.monotonic() > deadline:
        return f"timed out after {args.timeout:g} s with {len(done)} of {args.ranks} ranks done"
    for r, p in enumerate(ranks):
        if r not in done and p.exitcode is not None:
            # Its "error" or "done" message may still be in the queue.
            p.join(0)
            return None if p.exitcode == 0 else f"rank {r} exited with code {p.exitcode} before it finished"
    return None


def main(argv):
    args = parse_args(argv)
    try:
        import torch  # noqa: F401 (checked here, used in the ranks)
        import torch.distributed as dist
    except ImportError as error:
        print(f"torch_ep.py: cannot import torch under {sys.executable}: {error}; install "
              f"Debian's python3-torch and run this script with /usr/bin/python3", file=sys.stderr)
        return EXIT_RUNTIME
    if not dist.is_available() or not dist.is_gloo_available():
        print(f"torch_ep.py: torch {torch.__version__} under {sys.executable} has no gloo backend",
              file=sys.stderr)
        return EXIT_RUNTIME
    return run(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
