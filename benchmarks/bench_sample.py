"""Generation speed of sample.generate: decoder key-value cache vs the naive loop that recomputes the
whole decoder at every step, on a randomly initialised preset (full 152,036-token vocabulary).

    python benchmarks/bench_sample.py                          # tiny_encdec, 256 new tokens, batch 1
    python benchmarks/bench_sample.py --batch_size=8 --threads=1
    python benchmarks/bench_sample.py --hidden_size=256 --num_layers=8   # a body that outweighs the head

Both paths run the encoder once and the LM head on the newest position only, so the difference is
the decoder: with the cache each step feeds one token and the encoder keys/values are projected
once; without it each step re-runs every decoder position and re-projects the encoder keys/values.
Tokens/s counts new tokens over all rows (greedy, EOS ignored so every run makes the same number).
Wall clock, median of --repeats runs after a warm-up, the two paths alternating so they see the same
machine load; the two paths' tokens are checked to be identical.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from model import EncoderDecoder  # noqa: E402
from model_config import get_preset  # noqa: E402
from sample import generate, pad_batch  # noqa: E402
from tokenizer import MODE_IDS  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny_encdec")
    p.add_argument("--hidden_size", type=int, default=None, help="override: width (MLP 3x, head_dim = width / heads)")
    p.add_argument("--num_layers", type=int, default=None, help="override: layers of each stack")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    overrides = {}
    if args.hidden_size:
        heads = get_preset(args.preset).num_heads
        overrides.update(hidden_size=args.hidden_size, intermediate_size=3 * args.hidden_size,
                         head_dim=args.hidden_size // heads)
    if args.num_layers:
        overrides.update(num_layers=args.num_layers, num_encoder_layers=args.num_layers)
    cfg = get_preset(args.preset, **overrides)
    model = EncoderDecoder(cfg).to(args.device).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [[MODE_IDS["R"]] + torch.randint(0, 151643, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.batch_size)]
    enc_ids, enc_mask = (t.to(args.device) for t in pad_batch(prompts))

    def run(use_cache):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate(model, enc_ids, enc_mask, args.new_tokens, use_cache=use_cache, eos_id=None)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    run(True), run(False)  # warm-up
    times = {True: [], False: []}
    for _ in range(args.repeats):
        (dt_cached, cached), (dt_naive, naive) = run(True), run(False)
        assert cached == naive, "cached and naive generation disagree"
        times[True].append(dt_cached)
        times[False].append(dt_naive)
    n = args.new_tokens * args.batch_size
    print(f"{args.preset} (hidden {cfg.hidden_size}, {cfg.num_encoder_layers}+{cfg.num_layers} layers), "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, batch {args.batch_size}, "
          f"{args.device}, {torch.get_num_threads()} threads")
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    for use_cache, name in ((True, "with cache"), (False, "without cache (naive)")):
        print(f"  {name:24s} {rate[use_cache]:9.1f} tokens/s   (median {statistics.median(times[use_cache]):.2f}s)")
    print(f"  speed-up {rate[True] / rate[False]:.1f}x, same tokens on both paths")


if __name__ == "__main__":
    main()
