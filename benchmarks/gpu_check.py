"""The GPU check: what only a CUDA machine can tell.

    python benchmarks/gpu_check.py                          # one CUDA GPU; qwen3_encdec_0.6b shapes
    python benchmarks/gpu_check.py --only=kernels           # just the Triton kernels
    python benchmarks/gpu_check.py --device=cpu --tiny      # the same code on CPU at toy shapes (debugging)

1. Kernels: each Triton kernel of kernels.py (rms_norm, swiglu, apply_rotary forward and backward,
   linear_cross_entropy's fused gradient) against its torch reference, in bf16, at the shapes of
   the 0.6B model. Truth is the reference in fp32 on the same (bf16) inputs; a kernel passes when its
   error is at most twice the torch bf16 reference's own error plus one bf16 ulp (2^-8) at the
   tensor's scale. The check also asserts that every Triton kernel really launched.
2. Steps: one bf16 (autocast) training step, forward + backward + fused AdamW, with each block
   under torch.compile as train.py compiles it, random weights:
     ours EncoderDecoder (qwen3_encdec_0.6b) on packed UL2 rows of the default mixture (as train.py
       feeds it), vs transformers' T5Gemma2ForConditionalGeneration at equal shapes on the same
       examples, one per row, padded to the batch's longest input and target;
     ours Qwen3 (qwen3_0.6b) vs transformers' Qwen3ForCausalLM, same weights, same unpadded windows.
   For each: which attention kernels ran (from torch.profiler event names: flex, flash, cudnn,
   efficient, or math = SDPA's unfused fallback / an eager softmax), real tokens/s (padding not
   counted), MFU, peak memory (torch.cuda.max_memory_allocated) and the loss. MFU divides the FLOPs
   the real tokens need (model_config's flops_per_example per example: attention within the example
   only, no padding) by the step time and the GPU's dense bf16 peak (train.py's table, or
   --peak_tflops); the same numerator for ours and transformers', so wasted work lowers MFU.
   Our step fails the check if SDPA's math fallback ran or no fused attention kernel did.

Exit status: 0 every check passed; 1 a check failed (the lines marked FAIL say which); 77 no CUDA
device (one line; --device=cpu runs the CPU debug mode instead). Status 77 is the usual "skipped"
of test harnesses, so a CPU-only CI can tell "not run" from "passed".
"""
import argparse
import gc
import math
import os
import re
import statistics
import sys
import time
from contextlib import nullcontext

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

SKIPPED = 77
FAILURES = []


def fail(msg):
    FAILURES.append(msg)
    print(f"FAIL {msg}", flush=True)


# ---------------------------------------------------------------------------------------
# 1. the Triton kernels against their torch references

def rel_err(got, truth):
    """max |got - truth| at the scale of the truth (its largest magnitude)."""
    truth = truth.float()
    return ((got.float() - truth).abs().max() / truth.abs().max().clamp_min(1e-30)).item()


def check_kernels(dev, dtype, tiny):
    import torch

    import kernels
    from model import segment_positions
    from model_components import Rotary
    if kernels.triton is None:
        fail("kernels: triton is not installed (pip install -e '.[gpu]'); the Triton kernels cannot run")
        return
    tol = 2.0 ** -8 if dtype == torch.bfloat16 else 1e-5  # one bf16 ulp; fp32 (interpreter) as tests/test_kernels
    launched = set()
    jit = kernels._kernel
    kernels._kernel = lambda fn: launched.add(fn.__name__) or jit(fn)
    kernels.use_triton(True)
    torch.manual_seed(0)
    # 0.6B shapes: 4 x 512 tokens, hidden 1024, d_ff 3072, 16 heads of 128, vocab 152,036
    B, T, C, F, H, D, V = (2, 24, 64, 96, 4, 16, 1000) if tiny else (4, 512, 1024, 3072, 16, 128, 152036)

    def leaf(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, device=dev) * scale).to(dt).requires_grad_()

    def run(name, fast, ref, inputs, upstream=True, truth=None):
        """Outputs and input gradients: Triton, torch reference in `dtype`, torch reference in fp32 (`truth`)."""
        leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        inputs32 = [x.detach().float().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) and
                    x.is_floating_point() else x for x in inputs]
        leaves32 = [x for x in inputs32 if isinstance(x, torch.Tensor) and x.requires_grad]
        out, out_ref, out32 = fast(*inputs), ref(*inputs), (truth or ref)(*inputs32)
        g = torch.randn(out32.shape, device=dev, generator=torch.Generator(dev).manual_seed(1)) if upstream \
            else torch.ones_like(out32)
        results = [(out, torch.autograd.grad(out, leaves, g.to(out.dtype))),
                   (out_ref, torch.autograd.grad(out_ref, leaves, g.to(out_ref.dtype))),
                   (out32, torch.autograd.grad(out32, leaves32, g))]
        names = ["forward"] + [f"grad {i}" for i in range(len(leaves))]
        for j, what in enumerate(names):
            fast_t, ref_t, truth = (r[0] if j == 0 else r[1][j - 1] for r in results)
            e_fast, e_ref = rel_err(fast_t, truth), rel_err(ref_t, truth)
            ok = e_fast <= 2 * e_ref + tol and math.isfinite(e_fast)
            print(f"  {name:32s} {what:8s} triton err {e_fast:.2e}   torch {str(dtype)[6:]} err {e_ref:.2e}"
                  f"   {'ok' if ok else 'FAIL'}", flush=True)
            if not ok:
                fail(f"kernels: {name} {what}: Triton error {e_fast:.2e} > 2 x torch's {e_ref:.2e} + {tol:.1e}")

    print(f"\n== Triton kernels vs torch references ({str(dtype)[6:]}, {dev}) ==", flush=True)
    w = lambda n: (torch.rand(n, device=dev) + 0.5).to(dtype).requires_grad_()  # noqa: E731  norm weights near 1
    run(f"rms_norm [{B * T}, {C}]", kernels.rms_norm, kernels.rms_norm_ref, (leaf(B * T, C, scale=3.0), w(C), 1e-6))
    run(f"rms_norm per head [{B}, {T}, {H}, {D}]", kernels.rms_norm, kernels.rms_norm_ref,
        (leaf(B, T, H, D, scale=3.0), w(D), 1e-6))
    run(f"swiglu [{B * T}, {F}]", kernels.swiglu, kernels.swiglu_ref, (leaf(B * T, F, scale=3.0), leaf(B * T, F)))
    rot = Rotary(D, 1e6)
    cos, sin = rot(torch.arange(T, device=dev), dtype)
    run(f"apply_rotary [{B}, {H}, {T}, {D}]", kernels.apply_rotary, kernels.apply_rotary_ref, (leaf(B, H, T, D), cos, sin))
    seg = torch.sort(torch.randint(1, 4, (B, T), device=dev), dim=1).values  # packed rows: positions restart
    cos_b, sin_b = rot(segment_positions(seg), dtype)
    run("apply_rotary packed positions", kernels.apply_rotary, kernels.apply_rotary_ref, (leaf(B, H, T, D), cos_b, sin_b))

    # the loss as training calls it: fp32 weight (the parameter), hidden states from the final norm, under
    # autocast in bf16 (fp32 and no autocast in the interpreter)
    N = B * T
    labels = torch.randint(0, V, (N,), device=dev)
    labels[torch.rand(N, device=dev) < 0.25] = -100
    autocast = torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def ce(fn):
        def call(h, wt):
            with autocast:
                return fn(h, wt, labels)
        return call

    run(f"linear_cross_entropy [{N}, {C}] x [{V}, {C}]", ce(kernels.linear_cross_entropy),
        ce(kernels.linear_cross_entropy_ref), (leaf(N, C, dt=torch.float32), leaf(V, C, scale=0.02, dt=torch.float32)),
        upstream=False, truth=lambda h, wt: kernels.linear_cross_entropy_ref(h, wt, labels))
    kernels._kernel = jit
    kernels.use_triton(False)
    expected = {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel",
                "_rotary_kernel", "_ce_grad_kernel"}
    if expected - launched:
        fail(f"kernels: the Triton path never launched {sorted(expected - launched)} (the torch fallback ran)")
    else:
        print(f"  launched: {', '.join(sorted(launched))}")


# ---------------------------------------------------------------------------------------
# 2. training steps

# profiler event names (CPU ops and GPU kernels) -> attention implementation
ATTENTION_KINDS = [
    ("flex", re.compile(r"flex_attention|triton_tem_")),  # inductor's template kernels: flex only, without max-autotune
    ("flash", re.compile(r"flash_attention|flash_fwd|flash_bwd|FlashAttn", re.I)),
    ("cudnn", re.compile(r"cudnn_attention|fort_native_sdpa")),
    ("efficient", re.compile(r"efficient_attention|fmha_|cutlassF|cutlassB")),
    # SDPA's unfused fallback, or any softmax (only attention has one: the losses use log-softmax)
    ("math", re.compile(r"_scaled_dot_product_attention_math|(?<!log)_softmax")),
]
FUSED = ("flex", "flash", "cudnn", "efficient")


def attention_kinds(names):
    return {kind: sorted(n for n in names if rx.search(n))[:3] for kind, rx in ATTENTION_KINDS
            if any(rx.search(n) for n in names)}


def profiled_names(step, batch, dev):
    import torch
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step(batch)
        sync(dev)
    return {e.name for e in prof.events()}


def precision(dtype):
    return "fp32" if str(dtype) == "torch.float32" else f"{str(dtype)[6:]} autocast"


def sync(dev):
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def compile_blocks(model):
    """torch.compile each transformer block in place, as train.py does (names and weights unchanged)."""
    n = 0
    for m in model.modules():
        if type(m).__name__ in ("Block", "Qwen3DecoderLayer", "T5Gemma2EncoderLayer", "T5Gemma2DecoderLayer"):
            m.compile()
            n += 1
    return n


def make_step(model, loss_fn, dev, dtype):
    import torch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.1,
                            fused=True)
    autocast = torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def step(batch):
        with autocast:
            loss = loss_fn(model, batch)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def run_model(name, build, loss_fn, batches, flops, real, args, dev, dtype, peak_flops, must_be_fused, compile_=None):
    """Warm up (compiles), time args.steps steps, profile one more; one result row, or None on failure."""
    compile_ = args.compile if compile_ is None else compile_
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = step = None
    cpu_batches = batches
    try:
        torch.manual_seed(0)
        with torch.device(dev):  # initialised where it trains: a 1B-parameter init on CPU takes long
            model = build()
        compiled = compile_blocks(model) if compile_ else 0
        step = make_step(model, loss_fn, dev, dtype)
        batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
        t0 = time.perf_counter()
        for b in batches[:args.warmup]:
            loss = step(b)
        sync(dev)
        warm_s = time.perf_counter() - t0
        graphs_before = counters["stats"]["unique_graphs"]
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times, losses = [], []
        for b in batches[args.warmup:args.warmup + args.steps]:
            t0 = time.perf_counter()
            loss = step(b)
            sync(dev)
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
        peak_mem = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        recompiled = counters["stats"]["unique_graphs"] - graphs_before
        breaks = sum(counters["graph_break"].values())
        kinds = attention_kinds(profiled_names(step, batches[args.warmup], dev))
    except torch.OutOfMemoryError:
        print(f"  {name}: out of GPU memory", flush=True)
        if must_be_fused:
            fail(f"{name}: out of GPU memory")
        return None
    except Exception as e:  # report and go on to the next model
        print(f"  {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
        if must_be_fused:
            fail(f"{name}: the step raised {type(e).__name__}")
            if args.traceback:
                raise
        return None
    finally:
        del model, step
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    timed = cpu_batches[args.warmup:args.warmup + args.steps]
    sec = sum(times)
    row = {"name": name, "attention": kinds, "tok_s": sum(real(b) for b in timed) / sec,
           "mfu": sum(flops(b) for b in timed) / sec / peak_flops if peak_flops else None,
           "s_step": statistics.median(times), "peak": peak_mem, "loss": losses[-1], "warm_s": warm_s,
           "compiled": compiled, "recompiled": recompiled, "breaks": breaks}
    used = [k for k in kinds if k in FUSED]
    attn = "+".join(sorted(kinds)) or "none seen"
    if must_be_fused and dev.type == "cuda":  # on CPU the kernels are SDPA's choice: reported, not asserted
        if "math" in kinds:
            fail(f"{name}: the math attention fallback ran ({kinds['math']})")
        elif not used:
            fail(f"{name}: no fused attention kernel in the profile")
    mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
    mem = "n/a" if peak_mem is None else f"{peak_mem / 2**30:.1f} GiB"
    print(f"  {name:22s} attention {attn:16s} {row['tok_s']:10,.0f} real tok/s   MFU {mfu}   "
          f"peak {mem}   {row['s_step']:.3f} s/step   "
          f"loss {row['loss']:.3f}   (warm-up {warm_s:.0f} s, {compiled} blocks compiled, {recompiled} "
          f"recompiles while timed, {breaks} graph breaks)", flush=True)
    for kind, names in kinds.items():
        print(f"      {kind}: {', '.join(n[:90] for n in names)}")
    return row


def run_theirs(name, build, loss_fn, batches, flops, real, args, dev, dtype, peak_flops):
    """transformers' model: compiled like ours; if that fails, eager, so there is still a figure to compare."""
    a = (build, loss_fn, batches, flops, real, args, dev, dtype, peak_flops)
    row = run_model(name, *a, must_be_fused=False)
    if row is None and args.compile:
        print(f"  {name}: again without torch.compile", flush=True)
        row = run_model(name + " (eager)", *a, must_be_fused=False, compile_=False)
    return row


def encdec_checks(args, dev, dtype, peak_flops):
    import torch

    from bench_step import padded_batch, segments, t5gemma2_model, ul2_batches
    from model import EncoderDecoder
    from model_config import get_preset
    from tokenizer import EOS_ID
    cfg = get_preset("tiny_encdec" if args.tiny else "qwen3_encdec_0.6b")
    batches = ul2_batches(args.enc_len, args.dec_len, args.rows, args.warmup + args.steps)
    lengths = lambda b: [(len(e), len(d)) for e, d, _ in segments(b)]  # noqa: E731
    flops = lambda b: sum(cfg.flops_per_example(e, d) for e, d in lengths(b))  # noqa: E731
    real = lambda b: sum(e + d for e, d in lengths(b))  # noqa: E731
    n_ex = sum(len(lengths(b)) for b in batches) / len(batches)
    frac = sum(real(b) for b in batches) / sum(b["enc_ids"].numel() + b["dec_ids"].numel() for b in batches)
    print(f"\n== {'tiny_encdec' if args.tiny else 'qwen3_encdec_0.6b'}: UL2 step, {args.rows} rows x ({args.enc_len} "
          f"+ {args.dec_len}) positions, {n_ex:.1f} examples per step (real-token fraction {frac:.3f}), "
          f"{precision(dtype)}, compile={bool(args.compile)}, {dev} ==", flush=True)

    def ours_loss(m, b):
        return m(b["enc_ids"], None, b["dec_ids"], labels=b["labels"], enc_seg=b["enc_seg"], dec_seg=b["dec_seg"])[1]

    rows = [run_model("ours EncoderDecoder", lambda: EncoderDecoder(cfg), ours_loss, batches, flops, real, args,
                      dev, dtype, peak_flops, must_be_fused=True)]
    if args.hf:
        hf_batches = [padded_batch(segments(b), EOS_ID) for b in batches]
        hf_real = lambda h: int(h["attention_mask"].sum() + h["decoder_attention_mask"].sum())  # noqa: E731
        hf_flops = {id(h): flops(b) for h, b in zip(hf_batches, batches)}
        hf_frac = sum(hf_real(h) for h in hf_batches) / sum(h["input_ids"].numel() + h["decoder_input_ids"].numel()
                                                           for h in hf_batches)
        print(f"  (transformers' batches: the same examples, one per row, real-token fraction {hf_frac:.3f})")
        rows.append(run_theirs("HF T5Gemma2", lambda: t5gemma2_model(cfg)[0], lambda m, b: m(**b).loss, hf_batches,
                               lambda h: hf_flops[id(h)], hf_real, args, dev, dtype, peak_flops))
    return rows


def qwen3_checks(args, dev, dtype, peak_flops):
    import torch

    from bench_step import hf_qwen3_model
    from model import Qwen3, to_hf_name
    from model_config import get_preset
    from tokenizer import EOS_ID
    cfg = get_preset("tiny" if args.tiny else "qwen3_0.6b")
    T = args.enc_len + args.dec_len
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.warmup + args.steps):
        ids = torch.randint(0, EOS_ID, (args.rows, T + 1), generator=g)
        batches.append({"idx": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()})
    flops = lambda b: args.rows * cfg.flops_per_example(0, T)  # noqa: E731
    real = lambda b: b["idx"].numel()  # noqa: E731
    print(f"\n== {'tiny' if args.tiny else 'qwen3_0.6b'}: causal step, {args.rows} rows x {T} tokens (no padding), "
          f"{precision(dtype)}, compile={bool(args.compile)}, {dev} ==", flush=True)
    state = {}

    def ours():
        m = Qwen3(cfg)
        state.update({to_hf_name(k): v.detach().clone() for k, v in m.state_dict().items()})
        return m

    def theirs():
        m = hf_qwen3_model(cfg)
        missing, unexpected = m.load_state_dict(state, strict=False)  # the same weights as ours
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise RuntimeError(f"weight names differ between model.py and transformers: {missing} {unexpected}")
        m.tie_weights()
        return m

    rows = [run_model("ours Qwen3", ours, lambda m, b: m(b["idx"], labels=b["labels"])[1], batches, flops, real,
                      args, dev, dtype, peak_flops, must_be_fused=True)]
    if args.hf:
        # transformers shifts the labels itself: it gets the window's first T tokens and scores T - 1 of them
        rows.append(run_theirs("HF Qwen3ForCausalLM", theirs, lambda m, b: m(input_ids=b["idx"], labels=b["idx"]).loss,
                               batches, flops, real, args, dev, dtype, peak_flops))
    return rows


def gpu_peak(dev, args):
    import torch
    if args.peak_tflops:
        return args.peak_tflops * 1e12, f"--peak_tflops {args.peak_tflops:g}"
    if dev.type != "cuda":
        return None, "no peak FLOP/s on CPU: MFU n/a"
    name = torch.cuda.get_device_name(dev)
    try:
        from train import GPU_PEAK_FLOPS
    except Exception as e:  # the trainer failed to import: say so, keep checking
        return None, f"MFU n/a: train.GPU_PEAK_FLOPS not importable ({type(e).__name__}: {e})"
    peak = next((f for n, f in GPU_PEAK_FLOPS if n in name), None)
    return peak, (f"{name}: dense bf16 peak {peak / 1e12:.0f} TFLOP/s (train.py)" if peak else
                  f"{name} is not in train.py's GPU_PEAK_FLOPS: MFU n/a (pass --peak_tflops)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy shapes (tiny / tiny_encdec presets) for a quick run")
    p.add_argument("--only", choices=["kernels", "encdec", "qwen3"], default=None)
    p.add_argument("--rows", type=int, default=None, help="rows per step (default 8; 2 with --tiny)")
    p.add_argument("--enc_len", type=int, default=None, help="encoder positions per row (default 512; 64 with --tiny)")
    p.add_argument("--dec_len", type=int, default=None, help="decoder positions per row (default 512; 64 with --tiny)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--compile", type=int, default=1, help="torch.compile each block (as train.py's compile=True)")
    p.add_argument("--hf", type=int, default=1, help="also run transformers' models")
    p.add_argument("--attention", choices=["auto", "sdpa", "flex"], default="auto",
                   help="model_components.set_attention_backend (auto: flex for masked attention on CUDA)")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="dense bf16 peak for MFU (default: train.py's table)")
    p.add_argument("--traceback", action="store_true", help="re-raise an error in our step instead of reporting it")
    args = p.parse_args()
    args.rows = args.rows or (2 if args.tiny else 8)
    args.enc_len = args.enc_len or (64 if args.tiny else 512)
    args.dec_len = args.dec_len or (64 if args.tiny else 512)
    if min(args.rows, args.enc_len, args.dec_len, args.steps) < 1 or args.warmup < 1:
        sys.exit("gpu_check.py: --rows, --enc_len, --dec_len, --steps and --warmup must be >= 1")

    if args.device == "cpu" and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # the kernels run in Triton's interpreter (set before triton loads)
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device (torch " + torch.__version__ + "); nothing checked, exit status 77 "
              "(--device=cpu --tiny runs the code on CPU)")
        sys.exit(SKIPPED)
    import model_components
    model_components.set_attention_backend(args.attention)
    dev = torch.device(args.device)
    # bf16 on the GPU; fp32 on CPU, where the Triton interpreter's bf16 arithmetic is inexact
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    peak_flops, peak_note = gpu_peak(dev, args)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (debug mode)"
    print(f"gpu_check: {where}, torch {torch.__version__}, {peak_note}", flush=True)

    if args.only in (None, "kernels"):
        check_kernels(dev, dtype, args.tiny)
    results = []
    if args.only in (None, "encdec"):
        results += encdec_checks(args, dev, dtype, peak_flops)
    if args.only in (None, "qwen3"):
        results += qwen3_checks(args, dev, dtype, peak_flops)
    pairs = [(results[i], results[i + 1]) for i in range(0, len(results) - 1, 2)] if args.hf else []
    for ours, theirs in pairs:
        if ours and theirs:
            print(f"{ours['name']} vs {theirs['name']}: {ours['tok_s'] / theirs['tok_s']:.2f}x the real tokens/s"
                  + (f", {ours['peak'] / theirs['peak']:.2f}x the peak memory" if ours["peak"] else ""))
    if FAILURES:
        print(f"gpu_check: {len(FAILURES)} check(s) failed: " + "; ".join(FAILURES))
        sys.exit(1)
    print("gpu_check: all checks passed")


if __name__ == "__main__":
    main()
