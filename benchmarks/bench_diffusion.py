"""Masked-diffusion sampling speed: LLaDA's plain sampler vs confidence-threshold decoding and the per-block
prefix key-value cache (Fast-dLLM), with the agreement of their tokens with the plain sampler's.

    python benchmarks/bench_diffusion.py --ckpt out/diffusion-sft/ckpt-0000300 --sft data/squad_sft/val.jsonl
    python benchmarks/bench_diffusion.py                     # random tiny Qwen3: speed only (agreement is noise)
    python benchmarks/bench_diffusion.py --preset qwen3_0.6b --device cuda --gen_length 256 --block_length 32

Each variant generates gen_length tokens for the same prompts (greedy, low-confidence remasking):
  plain              steps = gen_length (one token per step), the whole sequence through the model each step
  threshold          every token of the block with confidence >= --threshold per step (at least one)
  cache              plain steps, the keys/values before the block reused from the block's first step
  threshold+cache    both
tokens/s = generated tokens of all rows / wall seconds (median of --repeats after a warm-up, the variants
interleaved so they see the same machine load); nfe = model calls; agreement = the fraction of generated
positions holding the plain sampler's token, and rows identical to it.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import diffusion  # noqa: E402
from model import Qwen3  # noqa: E402
from model_config import get_preset  # noqa: E402
from sample import pad_batch  # noqa: E402


def prompts_from(args):
    if args.sft:
        from tokenizer import load_tokenizer
        tok = load_tokenizer()
        convs = diffusion.read_conversations(args.sft)[:args.num_prompts]
        return [diffusion.chat_ids(tok, system, pairs[0:0], pairs[0][0])[-args.max_prompt_len:]
                for system, pairs in convs], tok
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 151643, (args.max_prompt_len,), generator=g).tolist()
            for _ in range(args.num_prompts)], None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=None, help="a Qwen3 checkpoint dir (default: a random --preset model)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--sft", default=None, help="conversation JSONL whose questions are the prompts (chat template)")
    p.add_argument("--num_prompts", type=int, default=8)
    p.add_argument("--max_prompt_len", type=int, default=256, help="prompt tokens kept (the last ones)")
    p.add_argument("--gen_length", type=int, default=64)
    p.add_argument("--block_length", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--cache", default="prefix", choices=["prefix", "dual"])
    p.add_argument("--block_attention", action="store_true")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--show", type=int, default=2, help="print this many plain / fast samples (with --sft)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    if args.ckpt:
        model = Qwen3.from_pretrained(args.ckpt)
    else:
        torch.manual_seed(0)
        model = Qwen3(get_preset(args.preset))
    model = model.to(device=args.device, dtype=dtype).eval()
    prompts, tok = prompts_from(args)
    batches = [pad_batch(prompts[i:i + args.batch_size], side="left")
               for i in range(0, len(prompts), args.batch_size)]
    common = dict(gen_length=args.gen_length, block_length=args.block_length, steps=args.gen_length,
                  block_attention=args.block_attention)
    variants = {"plain": {}, "threshold": {"threshold": args.threshold}, "cache": {"cache": args.cache},
                "threshold+cache": {"threshold": args.threshold, "cache": args.cache}}

    def run(kw):
        outs, nfe = [], 0
        for ids, mask in batches:
            stats = {}
            x = diffusion.generate(model, ids.to(args.device), mask.to(args.device), stats=stats, **common, **kw)
            outs.append(x[:, ids.shape[1]:].cpu())
            nfe += stats["nfe"]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return outs, nfe

    times = {name: [] for name in variants}
    results = {}
    for r in range(args.repeats + 1):  # the first round warms up
        for name, kw in variants.items():
            t0 = time.perf_counter()
            outs, nfe = run(kw)
            dt = time.perf_counter() - t0
            if r:
                times[name].append(dt)
            results[name] = (outs, nfe)
    plain = torch.cat(results["plain"][0])
    n_tokens = plain.numel()
    rows = []
    for name in variants:
        out = torch.cat(results[name][0])
        dt = statistics.median(times[name])
        rows.append({"variant": name, "tokens_per_s": n_tokens / dt, "seconds": dt, "nfe": results[name][1],
                     "agreement": float((out == plain).float().mean()),
                     "rows_identical": int((out == plain).all(1).sum()), "rows": len(out)})
    base = rows[0]["tokens_per_s"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"
    print(f"# {args.ckpt or 'random ' + args.preset} on {device} {str(dtype)[6:]}, {len(prompts)} prompts "
          f"(batch {args.batch_size}), gen {args.gen_length}, block {args.block_length}, threshold {args.threshold}, "
          f"cache {args.cache}{', block attention' if args.block_attention else ''}")
    print(f"{'variant':16s} {'tokens/s':>9s} {'speedup':>8s} {'nfe':>6s} {'agreement':>10s} {'rows same':>10s}")
    for row in rows:
        print(f"{row['variant']:16s} {row['tokens_per_s']:9.1f} {row['tokens_per_s'] / base:7.2f}x {row['nfe']:6d} "
              f"{100 * row['agreement']:9.1f}% {row['rows_identical']:>5d}/{row['rows']}")
    if tok is not None and args.show:
        fast = torch.cat(results["threshold+cache"][0])
        for i in range(min(args.show, len(plain))):
            print(f"--- prompt {i}: plain: {tok.decode(diffusion_text(plain[i].tolist()))!r}")
            print(f"    threshold+cache: {tok.decode(diffusion_text(fast[i].tolist()))!r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device, "results": rows}, f, indent=1)
    return rows


def diffusion_text(ids):
    from sample import diffusion_text as cut
    return cut(ids)


if __name__ == "__main__":
    main()
