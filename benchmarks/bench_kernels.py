"""Per-kernel time and peak memory (torch eager vs torch.compile vs Triton) and the chunked
cross-entropy against naive logits-then-cross-entropy, at Qwen3-0.6B shapes.

    python benchmarks/bench_kernels.py                 # everything
    python benchmarks/bench_kernels.py --only=ce       # cross-entropy only (done-when 2)
    python benchmarks/bench_kernels.py --only=ops --compile=0

Timing: CUDA events on GPU, wall clock on CPU; best of --repeats calls after a warm-up. Peak
memory, from one more call: on GPU torch.cuda.max_memory_allocated above what was allocated
before the call; on CPU the peak resident set size (VmHWM, reset through /proc/self/clear_refs)
above the RSS before the call, with glibc told to mmap every allocation of 64 KiB or more for
that call (so freed memory leaves the RSS at once and reused heap cannot hide a peak). The
cross-entropy paths each run once in a fresh subprocess for memory, loss and gradients, then
take turns in the main process for --repeats timed calls each (same machine load for all).
Triton figures need CUDA (the interpreter is not a benchmark).
"""
import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import kernels  # noqa: E402

CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------------------------------
# measuring

LIBC = ctypes.CDLL("libc.so.6") if not CUDA else None
M_MMAP_THRESHOLD = -3


def _rss_kb(field):
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1))


def peak_mib(fn):
    """Peak memory of one call of fn, in MiB above the memory in use before it."""
    if CUDA:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # glibc keeps freed small blocks in its heap, where a later allocation reuses them unseen by
    # the RSS: for this call every allocation of 64 KiB or more gets its own mmap, returned on free
    gc.collect()
    LIBC.mallopt(M_MMAP_THRESHOLD, 64 << 10)
    LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _rss_kb("VmRSS")
    fn()
    peak = (_rss_kb("VmHWM") - base) / 1024
    LIBC.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    return peak


def time_ms(fn, repeats):
    """Best of `repeats` calls, in ms."""
    times = []
    for _ in range(repeats):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


# ---------------------------------------------------------------------------------------
# per-kernel: forward + backward of each op

def op_cases(tokens, dtype, device):
    """(name, fn, make_inputs) at Qwen3-0.6B widths: hidden 1024, 16 heads x 128, MLP 3072."""
    B, T = max(1, tokens // 2048), min(tokens, 2048)

    def leaf(*shape):
        return torch.randn(*shape, dtype=dtype, device=device, requires_grad=True)

    def rotary_inputs():
        ang = torch.randn(T, 128, device=device)
        return (torch.randn(B, T, 16, 128, dtype=dtype, device=device).transpose(1, 2).requires_grad_(),
                ang.cos().to(dtype), ang.sin().to(dtype))

    return [
        ("rms_norm [N,1024]", "rms_norm", lambda: (leaf(B * T, 1024), leaf(1024), 1e-6)),
        ("rms_norm qk [N*16,128]", "rms_norm", lambda: (leaf(B * T * 16, 128), leaf(128), 1e-6)),
        ("swiglu [N,3072]", "swiglu", lambda: (leaf(B * T, 3072), leaf(B * T, 3072))),
        ("rotary [B,16,T,128]", "apply_rotary", rotary_inputs),
    ]


def fwd_bwd(fn, args):
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def run():
        out = fn(*args)
        torch.autograd.grad(out, leaves, torch.ones_like(out))
    return run


def bench_ops(args):
    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    print(f"\n== per-kernel forward+backward, {args.tokens} tokens, {dtype}, {device} ==")
    if not CUDA:
        print("(CPU: eager and torch.compile only; Triton needs CUDA. Peak = RSS high-water mark.)")
    print(f"{'op':26s} {'impl':9s} {'ms':>9s} {'peak MiB':>9s}")
    for label, name, make in op_cases(args.tokens, dtype, device):
        ref = getattr(kernels, name + "_ref")
        impls = [("eager", ref)]
        if args.compile:
            impls.append(("compile", torch.compile(ref)))
        if CUDA and kernels.triton is not None:
            impls.append(("triton", getattr(kernels, name)))
        for impl, fn in impls:
            kernels.use_triton(impl == "triton")
            inputs = make()
            run = fwd_bwd(fn, inputs)
            run()  # warm-up (and compilation)
            ms, peak = time_ms(run, args.repeats), peak_mib(run)
            print(f"{label:26s} {impl:9s} {ms:9.2f} {peak:9.1f}", flush=True)
            del inputs, run
    kernels.use_triton(False)


# ---------------------------------------------------------------------------------------
# cross-entropy: naive vs chunked, each path in its own process

def ce_inputs(n, c, v, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.empty(n, c, dtype=dtype, device=device).normal_(generator=g).requires_grad_()
    weight = torch.empty(v, c, dtype=dtype, device=device).normal_(0, 0.02, generator=g).requires_grad_()
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    labels[torch.rand(n, device=device, generator=g) < 0.1] = -100  # some padding
    return hidden, weight, labels


def ce_path(path, hidden, weight, labels):
    def run():
        hidden.grad = weight.grad = None
        if path == "naive":
            loss = F.cross_entropy(hidden @ weight.t(), labels)
        else:
            kernels.use_triton(path == "triton")
            loss = kernels.linear_cross_entropy(hidden, weight, labels)
        loss.backward()
        run.loss = loss.item()
    return run


def ce_worker(path, n, c, v, grads_file):
    """One cold call of one path in a fresh process: its peak memory, loss and gradients."""
    device = "cuda" if CUDA else "cpu"
    hidden, weight, labels = ce_inputs(n, c, v, torch.bfloat16 if CUDA else torch.float32, device)
    run = ce_path(path, hidden, weight, labels)
    peak = peak_mib(run)
    torch.save({"hidden": hidden.grad, "weight": weight.grad}, grads_file)
    print(json.dumps({"path": path, "peak_mib": peak, "loss": run.loss}))


def bench_ce(args):
    n, c, v = args.ce_tokens, args.ce_hidden, args.ce_vocab
    paths = ["naive", "chunked"] + (["triton"] if CUDA and kernels.triton is not None else [])
    print(f"\n== linear cross-entropy fwd+bwd, {n} tokens x hidden {c} x vocab {v}, "
          f"{'bf16 cuda' if CUDA else 'fp32 cpu'} ==", flush=True)
    # memory, loss and gradients: each path alone in a fresh process
    results, errs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            cmd = [sys.executable, os.path.abspath(__file__), f"--ce-worker={path}", f"--ce-tokens={n}",
                   f"--ce-hidden={c}", f"--ce-vocab={v}", f"--threads={args.threads}",
                   f"--grads-file={os.path.join(tmp, path + '.pt')}"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"bench_kernels.py: the {path} cross-entropy worker failed:\n{out.stderr[-2000:]}")
            results[path] = json.loads(out.stdout.strip().splitlines()[-1])
        naive = torch.load(os.path.join(tmp, "naive.pt"))
        for path in paths:
            grads = torch.load(os.path.join(tmp, path + ".pt"))
            errs[path] = [((grads[k].float() - naive[k].float()).abs().max() / naive[k].float().abs().max()).item()
                          for k in ("hidden", "weight")]
        del naive, grads
    # time: the paths take turns in this process, so they see the same machine load
    device = "cuda" if CUDA else "cpu"
    inputs = ce_inputs(n, c, v, torch.bfloat16 if CUDA else torch.float32, device)
    runs = {path: ce_path(path, *inputs) for path in paths}
    times = {path: [] for path in paths}
    for _ in range(args.repeats):
        for path in paths:
            times[path].append(time_ms(runs[path], 1))
    print(f"{'path':8s} {'best ms':>9s} {'peak MiB':>9s} {'time/naive':>10s} {'mem/naive':>9s} {'loss':>12s}"
          f" {'max|dL/dh| err':>15s} {'max|dL/dW| err':>15s}")
    for path, r in results.items():
        ms, ms_naive = min(times[path]), min(times["naive"])
        print(f"{path:8s} {ms:9.0f} {r['peak_mib']:9.0f} {ms / ms_naive:10.2f} "
              f"{r['peak_mib'] / results['naive']['peak_mib']:9.3f} {r['loss']:12.6f} {errs[path][0]:15.2e}"
              f" {errs[path][1]:15.2e}")
    print(f"(best of {args.repeats} alternating calls; all times ms: "
          + "; ".join(f"{p} {', '.join(f'{t:.0f}' for t in ts)}" for p, ts in times.items()) + ")")
    print("(grad errors: max abs difference / max abs value of the naive gradient)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["ops", "ce"], default=None)
    p.add_argument("--tokens", type=int, default=4096, help="tokens for the per-kernel shapes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", type=int, default=1, help="also time torch.compile of the references")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--ce-tokens", type=int, default=4096)
    p.add_argument("--ce-hidden", type=int, default=1024)
    p.add_argument("--ce-vocab", type=int, default=152036)
    p.add_argument("--ce-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--grads-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ce_worker:
        return ce_worker(args.ce_worker, args.ce_tokens, args.ce_hidden, args.ce_vocab, args.grads_file)
    print(f"torch {torch.__version__}, {'CUDA ' + torch.cuda.get_device_name() if CUDA else 'CPU'}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    if args.only in (None, "ops"):
        bench_ops(args)
    if args.only in (None, "ce"):
        bench_ce(args)


if __name__ == "__main__":
    main()
