"""Embedding throughput (sentences/s, tokenisation included) on STS-B test sentences, on this CPU:
our encoder (random weights of a preset, extracted with extract.py) through this project's Encoder and
through sentence-transformers, next to all-MiniLM-L6-v2 through sentence-transformers.

    python benchmarks/bench_embed.py [--preset tiny_encdec] [--n 2000] [--batch_size 32] [--threads 2]
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval_embed  # noqa: E402
import extract  # noqa: E402
import model as M  # noqa: E402
from model_config import get_preset  # noqa: E402

SHARED = os.environ.get("QWEN_ENCDEC_SHARED_DATA",
                        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data"))


def sentences(n):
    path = os.path.join(SHARED, "sts", "stsb_test.tsv")
    if not os.path.isfile(path):
        sys.exit(f"bench_embed: {path} missing; set QWEN_ENCDEC_SHARED_DATA to the shared data directory")
    _, a, b = eval_embed.read_sts(path)
    texts = list(dict.fromkeys(a + b))
    return (texts * (n // len(texts) + 1))[:n]


def timed(name, encode, texts, batch_size):
    encode(texts[:batch_size], batch_size)  # warm-up: first-call allocations, lazy imports
    t0 = time.perf_counter()
    e = encode(texts, batch_size)
    dt = time.perf_counter() - t0
    print(f"{name:45s} {len(texts) / dt:8.1f} sentences/s   ({len(texts)} in {dt:.1f}s, dim {e.shape[1]})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny_encdec")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = sentences(args.n)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"STS-B test sentences (mean {sum(len(t.split()) for t in texts) / len(texts):.1f} words)")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        M.EncoderDecoder(get_preset(args.preset)).save_pretrained(os.path.join(tmp, "ckpt-0000001"))
        enc_dir = os.path.join(tmp, "encoder")
        extract.main(["--ckpt", tmp, "--out", enc_dir])
        ours = eval_embed.Encoder.from_pretrained(enc_dir)
        timed(f"ours ({args.preset}), project Encoder", lambda t, b: ours.encode(t, batch_size=b), texts,
              args.batch_size)
        st = eval_embed.STModel(enc_dir)
        timed(f"ours ({args.preset}), sentence-transformers", lambda t, b: st.encode(t, batch_size=b), texts,
              args.batch_size)
    minilm = eval_embed.STModel(eval_embed.minilm_path())
    timed("all-MiniLM-L6-v2, sentence-transformers", lambda t, b: minilm.encode(t, batch_size=b), texts,
          args.batch_size)


if __name__ == "__main__":
    main()
