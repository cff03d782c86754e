"""Throughput of ul2.make_batch in source tokens per second, on one CPU core.

python benchmarks/bench_ul2.py [--enc_len=512 --dec_len=512 --batch=64 --iters=50 --repeats=7]

The process is pinned to one core (the data loader gets about one core per GPU). Each repeat
times `iters` batches at consecutive steps; the best and the median repeat are reported,
since on a shared machine the best is the closest to the code's own speed.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ul2  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--enc_len", type=int, default=512)
parser.add_argument("--dec_len", type=int, default=512)
parser.add_argument("--batch", type=int, default=64)
parser.add_argument("--iters", type=int, default=50)
parser.add_argument("--repeats", type=int, default=7)
args = parser.parse_args()

if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
u = ul2.UL2(args.enc_len, args.dec_len)
# uint32, as the shards hand windows over
windows = np.random.default_rng(0).integers(0, 151643, size=(args.batch, u.window_len)).astype(np.uint32)
u.make_batch(windows, step=0)  # warm up

rates = []
for r in range(args.repeats):
    t0 = time.perf_counter()
    for step in range(args.iters):
        u.make_batch(windows, step=r * args.iters + step)
    rates.append(args.iters * windows.size / (time.perf_counter() - t0))

print(f"default mixture {u.denoiser_names}, enc_len={args.enc_len} dec_len={args.dec_len} "
      f"window_len={u.window_len} batch={args.batch}, one core")
print(f"source tokens/s: best {max(rates):,.0f}  median {np.median(rates):,.0f}  "
      f"(over {args.repeats} repeats of {args.iters} batches)")
