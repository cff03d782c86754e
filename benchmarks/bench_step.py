"""One full training step (forward, backward, AdamW) of our models against the transformers
models a user would otherwise pick, in one process, on the same tokens:

    our Qwen3           vs  transformers Qwen3ForCausalLM (same config, same weights, sdpa)
    our EncoderDecoder  vs  transformers T5Gemma2ForConditionalGeneration, text only, matched
                            widths/depths (SwiGLU, tied embeddings, merged attention; its vision
                            tower shrunk to a stub and frozen)

    python benchmarks/bench_step.py                      # hidden 256, 4 layers, vocab 152,036
    python benchmarks/bench_step.py --profile            # plus where each step's time goes
    python benchmarks/bench_step.py --only=qwen3 --steps=3
    python benchmarks/bench_step.py --ul2                # UL2 batches of the default mixture (below)

--ul2 trains both encoder-decoders on the same examples of the default UL2 mixture: ours as
train.py feeds it (--batch rows of --enc_len + --dec_len positions), T5Gemma2 with one example per
row right-padded to the longest input and target of the batch (a padding collator). Tokens/s
count real tokens only (not padding), the same number for both; the two models alternate batch
by batch, each batch runs --repeats times and its fastest run counts. Peak memory is measured
as below, each model in a fresh process, and is the highest over the batches. Its last line:
    ul2 step: real-token fraction F, real tokens/s Rx transformers T5Gemma2, peak memory Mx
F = real tokens / computed positions of ours; R and M are ours relative to T5Gemma2.

Time: wall clock of --steps steps after one warm-up, the two models of a pair alternating
step by step so they see the same machine load; the ratio uses the fastest step of each (on
a shared machine the fastest step is the one least disturbed), the median is printed too. Peak memory: parameters and
AdamW state (counted exactly from the tensors) plus the rise of the resident set during one
step (VmHWM reset through /proc/self/clear_refs; for that step glibc serves every allocation
of 64 KiB or more with its own mmap and trims the heap first, so freed memory leaves the RSS at
once and the high-water mark follows the live tensors). Gradients are set to None before every
step, so they count in the step.
"""
import argparse
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time

import numpy as np

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import kernels  # noqa: E402
from model import EncoderDecoder, Qwen3, to_hf_name  # noqa: E402
from model_config import ModelConfig  # noqa: E402
import ul2 as ul2_lib  # noqa: E402
from tokenizer import EOS_ID, IGNORE_INDEX, VOCAB_SIZE  # noqa: E402

LIBC = ctypes.CDLL("libc.so.6")
M_MMAP_THRESHOLD = -3


# ---------------------------------------------------------------------------------------
# the model pairs

def our_config(args, encoder_layers):
    return ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                       num_layers=args.layers, num_encoder_layers=encoder_layers, num_heads=args.hidden // 64,
                       num_kv_heads=max(1, args.hidden // 128), head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6,
                       max_seq_len=4096, tie_embeddings=True)


def hf_qwen3_model(cfg):
    """transformers' Qwen3ForCausalLM with our config's shapes (sdpa attention)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    hf_cfg = Qwen3Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                         head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                         tie_word_embeddings=cfg.tie_embeddings, use_cache=False)
    return Qwen3ForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")


def qwen3_pair(args, tokens):
    cfg = our_config(args, 0)
    ours = Qwen3(cfg)
    theirs = hf_qwen3_model(cfg)
    # same weights, so the two losses must agree: the benchmark checks that it compares like with like
    missing, unexpected = theirs.load_state_dict({to_hf_name(k): v for k, v in ours.state_dict().items()},
                                                 strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        sys.exit(f"bench_step.py: weight names differ between model.py and transformers: {missing} {unexpected}")
    theirs.tie_weights()
    idx = tokens[:, :args.seq].contiguous()
    labels = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], IGNORE_INDEX)], 1)  # ours: labels[t] = idx[t+1]
    return [("ours Qwen3", ours, lambda m: m(idx, labels=labels)[1]),
            ("HF Qwen3ForCausalLM", theirs, lambda m: m(input_ids=idx, labels=idx).loss)]  # HF shifts itself


def t5gemma2_model(cfg):
    """transformers' T5Gemma2ForConditionalGeneration at our shapes: text only, SwiGLU, tied embeddings,
    merged attention; its vision tower (always built) shrunk to a stub and frozen. Returns (model, pad id)."""
    from transformers import T5Gemma2Config, T5Gemma2ForConditionalGeneration
    pad = EOS_ID if cfg.vocab_size > EOS_ID else 0  # a trimmed vocabulary (--vocab) has no <|endoftext|>
    text = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_activation="silu",
                layer_types=["full_attention"] * cfg.num_layers, query_pre_attn_scalar=cfg.head_dim,
                max_position_embeddings=4096, rms_norm_eps=cfg.rms_norm_eps, sliding_window=4096,
                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta}},
                pad_token_id=pad, eos_token_id=pad, bos_token_id=pad, use_cache=False)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=16, patch_size=8)  # T5Gemma2 always builds one; a frozen stub here
    hf_cfg = T5Gemma2Config(encoder=dict(text_config=text, vision_config=vision, mm_tokens_per_image=4),
                            decoder=text, tie_word_embeddings=True)
    theirs = T5Gemma2ForConditionalGeneration._from_config(hf_cfg, attn_implementation="sdpa")
    for p in theirs.model.encoder.vision_tower.parameters():
        p.requires_grad_(False)
    for p in theirs.model.encoder.multi_modal_projector.parameters():
        p.requires_grad_(False)
    return theirs, pad


def encdec_pair(args, tokens):
    cfg = our_config(args, args.layers)
    ours = EncoderDecoder(cfg)
    theirs, pad = t5gemma2_model(cfg)
    enc, dec = tokens[:, :args.seq].contiguous(), tokens[:, args.seq:args.seq + args.seq // 2].contiguous()
    enc_mask = torch.ones_like(enc, dtype=torch.bool)
    dec_in = torch.cat([torch.full_like(dec[:, :1], pad), dec[:, :-1]], 1)  # decoder start, then shifted
    return [("ours EncoderDecoder", ours, lambda m: m(enc, enc_mask, dec_in, labels=dec)[1]),
            ("HF T5Gemma2", theirs, lambda m: m(input_ids=enc, attention_mask=enc_mask.long(),
                                                decoder_input_ids=dec_in, labels=dec).loss)]


# ---------------------------------------------------------------------------------------
# one step, timed and measured

def make_step(model, loss_fn):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)  # as train.py runs it

    def step(*inputs):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, *inputs)
        loss.backward()
        opt.step()
        return loss.item()
    step.opt, step.params = opt, params
    return step


def static_bytes(step):
    state = [t for s in step.opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in list(step.params) + state)


def rss_kb(field):
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1))


def step_peak_bytes(step, *inputs):
    gc.collect()
    LIBC.mallopt(M_MMAP_THRESHOLD, 64 << 10)
    LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss_kb("VmRSS")
    step(*inputs)
    peak = (rss_kb("VmHWM") - base) * 1024
    LIBC.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # back to the threshold of the timed steps
    return peak


def profile_step(name, step, rows):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"\n-- where the time of one step goes: {name} --")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def bench_pair(title, pair, tokens_per_step, args):
    print(f"\n== {title} ==", flush=True)
    steps = [(name, make_step(model, loss_fn)) for name, model, loss_fn in pair]
    losses = {name: step() for name, step in steps}  # warm-up: allocates the AdamW state
    times = {name: [] for name, _ in steps}
    for _ in range(args.steps):
        for name, step in steps:
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name, step in steps:
        fixed = static_bytes(step)
        rows.append((name, min(times[name]), fixed, fixed + step_peak_bytes(step), losses[name]))
    print(f"{'model':22s} {'params':>8s} {'s/step':>8s} {'median':>8s} {'tok/s':>8s} {'static MiB':>10s}"
          f" {'peak MiB':>9s} {'first loss':>10s}")
    for (name, model, _), (_, sec, fixed, peak, loss) in zip(pair, rows):
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{name:22s} {n / 1e6:7.1f}M {sec:8.3f} {statistics.median(times[name]):8.3f}"
              f" {tokens_per_step / sec:8.0f} {fixed / 2**20:10.0f} {peak / 2**20:9.0f} {loss:10.4f}")
    (_, ours_s, _, ours_m, _), (_, theirs_s, _, theirs_m, _) = rows
    print(f"ratios: ours is {theirs_s / ours_s:.2f}x as fast, at {ours_m / theirs_m:.2f}x the peak memory")
    if args.profile:
        for name, step in steps:
            profile_step(name, step, args.profile_rows)
    return theirs_s / ours_s, ours_m / theirs_m


# ---------------------------------------------------------------------------------------
# --ul2: real UL2 batches of the default mixture, ours as train.py feeds it, T5Gemma2 padded

def ul2_batches(enc_len, dec_len, rows, count, seed=0):
    """`count` micro-batches of the default UL2 mixture in the layout our model trains on: {enc_ids, enc_seg,
    dec_ids, dec_seg, labels} with segment ids (0 = padding, k = the k-th example of a row), packed as
    train.py packs them (ul2.UL2.make_packed), or one padded example per row where ul2.py does not pack.
    Windows are random text ids: a step's cost does not depend on which ids they are."""
    u = ul2_lib.UL2(enc_len, dec_len, seed=seed)
    rng = np.random.default_rng(seed)
    keys = ("enc_ids", "enc_seg", "dec_ids", "dec_seg", "labels")
    out = []
    for step in range(count):
        if hasattr(u, "make_packed"):
            windows = rng.integers(0, EOS_ID, (rows, enc_len + dec_len))
            b = u.make_packed(windows, step=step, rows=range(step * rows, (step + 1) * rows))
        else:
            b = u.make_batch(rng.integers(0, EOS_ID, (rows, u.window_len)), step=step)
            b["enc_seg"] = b["enc_mask"].astype(np.int64)
            b["dec_seg"] = (b["labels"] != IGNORE_INDEX).astype(np.int64)
        out.append({k: torch.from_numpy(np.ascontiguousarray(b[k])) for k in keys})
    return out


def segments(batch):
    """The examples of a batch, row by row and segment by segment: (encoder ids, decoder ids, labels)."""
    out = []
    for r in range(batch["enc_ids"].shape[0]):
        enc_seg, dec_seg = batch["enc_seg"][r], batch["dec_seg"][r]
        for k in range(1, int(max(enc_seg.max(), dec_seg.max())) + 1):
            e, d = enc_seg == k, dec_seg == k
            if e.any() or d.any():
                out.append((batch["enc_ids"][r][e], batch["dec_ids"][r][d], batch["labels"][r][d]))
    return out


def padded_batch(examples, pad):
    """The same examples as transformers wants them: one per row, right-padded to the longest input and the
    longest target of the batch (what a padding collator does), with attention masks and -100 labels."""
    S = max(len(e) for e, _, _ in examples)
    T = max(len(d) for _, d, _ in examples)
    n = len(examples)
    b = {"input_ids": torch.full((n, S), pad), "attention_mask": torch.zeros(n, S, dtype=torch.long),
         "decoder_input_ids": torch.full((n, T), pad), "decoder_attention_mask": torch.zeros(n, T, dtype=torch.long),
         "labels": torch.full((n, T), IGNORE_INDEX)}
    for i, (e, d, y) in enumerate(examples):
        b["input_ids"][i, :len(e)], b["attention_mask"][i, :len(e)] = e, 1
        b["decoder_input_ids"][i, :len(d)], b["decoder_attention_mask"][i, :len(d)] = d, 1
        b["labels"][i, :len(y)] = y
    return b


def real_tokens(batch):
    return int((batch["enc_seg"] > 0).sum() + (batch["dec_seg"] > 0).sum())


def positions(batch):
    return batch["enc_ids"].numel() + batch["dec_ids"].numel()


def our_ul2_loss(model, b):
    return model(b["enc_ids"], None, b["dec_ids"], labels=b["labels"], enc_seg=b["enc_seg"], dec_seg=b["dec_seg"])[1]


def hf_ul2_loss(model, b):
    return model(**b).loss


def ul2_models(args, which):
    cfg = our_config(args, args.layers)
    torch.manual_seed(0)
    if which == "ours":
        return EncoderDecoder(cfg), None
    return t5gemma2_model(cfg)


def ul2_memory(args, which):
    """In a fresh process (--ul2-child): the peak memory of one model over the benchmark's batches,
    parameters and AdamW state counted exactly plus the resident-set rise of each step."""
    batches = ul2_batches(args.enc_len, args.dec_len, args.batch, args.steps + 1)
    model, pad = ul2_models(args, which)
    if which == "ours":
        step, inputs = make_step(model, our_ul2_loss), batches
    else:
        step, inputs = make_step(model, hf_ul2_loss), [padded_batch(segments(b), pad) for b in batches]
    step(inputs[0])  # allocates the AdamW state
    fixed = static_bytes(step)
    print(json.dumps({"peak": fixed + max(step_peak_bytes(step, b) for b in inputs[1:])}))


def child_peak(which):
    argv = [a for a in sys.argv[1:] if not a.startswith("--ul2-child")]
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, f"--ul2-child={which}"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"bench_step.py: the memory run of {which} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def bench_ul2(args):
    batches = ul2_batches(args.enc_len, args.dec_len, args.batch, args.steps + 1)
    ours, _ = ul2_models(args, "ours")
    theirs, pad = ul2_models(args, "hf")
    hf_batches = [padded_batch(segments(b), pad) for b in batches]
    for b, h in zip(batches, hf_batches):  # same examples, same real tokens
        assert real_tokens(b) == int(h["attention_mask"].sum() + h["decoder_attention_mask"].sum())
    runs = [("ours EncoderDecoder", make_step(ours, our_ul2_loss), batches),
            ("HF T5Gemma2", make_step(theirs, hf_ul2_loss), hf_batches)]
    losses = [step(inputs[0]) for _, step, inputs in runs]  # warm-up: allocates the AdamW state
    # each timed batch once per repeat and model, the two models alternating; the fastest run of each batch
    # counts (the least disturbed by other work on a shared machine)
    best = [[float("inf")] * args.steps for _ in runs]
    for rep in range(args.repeats):
        for i in range(1, args.steps + 1):
            for j in ((0, 1) if (rep + i) % 2 else (1, 0)):
                _, step, inputs = runs[j]
                t0 = time.perf_counter()
                step(inputs[i])
                best[j][i - 1] = min(best[j][i - 1], time.perf_counter() - t0)
    real = sum(real_tokens(b) for b in batches[1:])
    peaks = [child_peak("ours"), child_peak("hf")]
    print(f"{'model':22s} {'rows':>5s} {'examples':>8s} {'positions':>9s} {'real':>6s} {'s/step':>7s}"
          f" {'real tok/s':>10s} {'peak MiB':>9s} {'first loss':>10s}")
    fractions = []
    for (name, _, inputs), times, peak, loss in zip(runs, best, peaks, losses):
        pos = sum(b["input_ids"].numel() + b["decoder_input_ids"].numel() if "input_ids" in b else positions(b)
                  for b in inputs[1:])
        rows = sum(len(b["labels"]) for b in inputs[1:]) / args.steps
        examples = sum(len(segments(b)) for b in batches[1:]) / args.steps
        fractions.append(real / pos)
        print(f"{name:22s} {rows:5.1f} {examples:8.1f} {pos / args.steps:9.0f} {real / pos:6.3f}"
              f" {sum(times) / args.steps:7.3f} {real / sum(times):10.0f} {peak / 2**20:9.0f} {loss:10.4f}")
    speed = sum(best[1]) / sum(best[0])
    print(f"ul2 step: real-token fraction {fractions[0]:.2f}, real tokens/s {speed:.2f}x transformers T5Gemma2, "
          f"peak memory {peaks[0] / peaks[1]:.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["qwen3", "encdec"], default=None)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4, help="layers per stack")
    p.add_argument("--vocab", type=int, default=VOCAB_SIZE)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256, help="tokens per row (the encoder's; the decoder gets half)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--triton", type=int, default=1, help="our kernels' Triton path where it can run (CUDA)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--profile-rows", type=int, default=12)
    p.add_argument("--ul2", action="store_true",
                   help="an encoder-decoder step on UL2 batches of the default mixture (rows = --batch)")
    p.add_argument("--enc_len", type=int, default=256, help="--ul2: encoder positions per row")
    p.add_argument("--dec_len", type=int, default=256, help="--ul2: decoder positions per row")
    p.add_argument("--repeats", type=int, default=2, help="--ul2: timed runs of each batch (the fastest counts)")
    p.add_argument("--ul2-child", choices=["ours", "hf"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hidden % 64:
        sys.exit("bench_step.py: --hidden must be a multiple of 64 (head_dim 64)")
    if args.ul2 and args.vocab != VOCAB_SIZE:
        sys.exit(f"bench_step.py: --ul2 needs the full vocabulary (--vocab={VOCAB_SIZE}): UL2 emits sentinel ids")
    if args.ul2 and args.steps < 1:
        sys.exit("bench_step.py: --steps must be >= 1")
    kernels.use_triton(bool(args.triton))
    if args.threads:
        torch.set_num_threads(args.threads)
    LIBC.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's usual threshold once warm, fixed for every timed step
    if args.ul2_child:
        return ul2_memory(args, args.ul2_child)
    if args.ul2:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
              f"hidden {args.hidden}, {args.layers} + {args.layers} layers, vocab {args.vocab}, {args.batch} rows of "
              f"{args.enc_len} encoder + {args.dec_len} decoder positions, default UL2 mixture, fp32 CPU, "
              f"{args.steps} batches x {args.repeats} timed runs; peak memory of each model in a fresh process")
        return bench_ul2(args)
    torch.manual_seed(0)
    tokens = torch.randint(0, min(args.vocab, EOS_ID), (args.batch, args.seq + args.seq // 2),
                           generator=torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
          f"hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, batch {args.batch} x {args.seq} tokens, "
          f"fp32 CPU, {args.steps} timed steps")
    if args.only in (None, "qwen3"):
        bench_pair("decoder-only: fwd + bwd + AdamW", qwen3_pair(args, tokens), args.batch * args.seq, args)
    gc.collect()
    if args.only in (None, "encdec"):
        bench_pair(f"encoder-decoder ({args.seq} encoder + {args.seq // 2} decoder tokens per row): "
                   "fwd + bwd + AdamW", encdec_pair(args, tokens), args.batch * (args.seq + args.seq // 2), args)


if __name__ == "__main__":
    main()
