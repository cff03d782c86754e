"""One full training step (forward, backward, AdamW) of our models against the transformers
models a user would otherwise pick, in one process, on the same tokens:

    our Qwen3           vs  transformers Qwen3ForCausalLM (same config, same weights, sdpa)
    our EncoderDecoder  vs  transformers T5Gemma2ForConditionalGeneration, text only, matched
                            widths/depths (SwiGLU, tied embeddings, merged attention; its vision
                            tower shrunk to a stub and frozen)

    python benchmarks/bench_step.py                      # hidden 256, 4 layers, vocab 152,036
    python benchmarks/bench_step.py --profile            # plus where each step's time goes
    python benchmarks/bench_step.py --only=qwen3 --steps=3

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
import os
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import kernels  # noqa: E402
from model import EncoderDecoder, Qwen3, to_hf_name  # noqa: E402
from model_config import ModelConfig  # noqa: E402
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


def qwen3_pair(args, tokens):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = our_config(args, 0)
    ours = Qwen3(cfg)
    hf_cfg = Qwen3Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                         head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                         tie_word_embeddings=True, use_cache=False)
    theirs = Qwen3ForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")
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


def encdec_pair(args, tokens):
    from transformers import T5Gemma2Config, T5Gemma2ForConditionalGeneration
    cfg = our_config(args, args.layers)
    ours = EncoderDecoder(cfg)
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

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model)
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


def step_peak_bytes(step):
    gc.collect()
    LIBC.mallopt(M_MMAP_THRESHOLD, 64 << 10)
    LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss_kb("VmRSS")
    step()
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
    args = p.parse_args()
    if args.hidden % 64:
        sys.exit("bench_step.py: --hidden must be a multiple of 64 (head_dim 64)")
    kernels.use_triton(bool(args.triton))
    if args.threads:
        torch.set_num_threads(args.threads)
    LIBC.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's usual threshold once warm, fixed for every timed step
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
