"""Tokenization throughput of the prepare path vs Hugging Face `tokenizers` batch encoding.

    python benchmarks/bench_tokenizer.py [--text FILE] [--repeat 4] [--trials 3]

Ours: shards.tokenize_documents (NFC, documents joined by <|endoftext|> and encoded in
chunks by tiktoken on a thread pool, one uint32 array), exactly what prepare.py runs.
Reference: a `tokenizers` byte-level BPE with the same normaliser, pre-tokenizer and
vocabulary (the shared vocab.json + merges.txt when present, else our save_hf output),
Tokenizer.encode_batch over the same documents; both use every core.
The ids must be identical. Documents: Tiny Shakespeare paragraphs, repeated --repeat times.
"""
import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from shards import tokenize_documents  # noqa: E402
from tokenizer import EOS_ID, PRETOKENIZE_REGEX, load_tokenizer  # noqa: E402

SHARED = os.environ.get("QWEN_ENCDEC_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))


def reference_tokenizer(tok):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    qwen = os.path.join(SHARED, "qwen3_tokenizer")
    if not os.path.exists(os.path.join(qwen, "merges.txt")):
        with tempfile.TemporaryDirectory() as d:
            tok.save_hf(d)
            return Tokenizer.from_file(os.path.join(d, "tokenizer.json")), "save_hf tokenizer.json"
    ref = Tokenizer(models.BPE.from_file(os.path.join(qwen, "vocab.json"), os.path.join(qwen, "merges.txt")))
    ref.normalizer = normalizers.NFC()
    ref.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    ref.decoder = decoders.ByteLevel()
    return ref, "shared vocab.json + merges.txt"


def best_of(trials, fn):
    times, out = [], None
    for _ in range(trials):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", default=os.path.join(SHARED, "corpus", "tiny_shakespeare.txt"))
    parser.add_argument("--repeat", type=int, default=4, help="repeat the document list this many times")
    parser.add_argument("--trials", type=int, default=3, help="report the best of this many runs")
    args = parser.parse_args()
    with open(args.text, encoding="utf-8") as f:
        docs = [p for p in f.read().split("\n\n") if p] * args.repeat
    tok = load_tokenizer()
    ref, ref_name = reference_tokenizer(tok)
    t_ours, (ours_flat, _) = best_of(args.trials, lambda: tokenize_documents(tok, docs))
    t_ref, theirs = best_of(args.trials, lambda: [e.ids for e in ref.encode_batch(docs)])
    theirs_flat = np.concatenate([np.array(ids + [EOS_ID], dtype=np.uint32) for ids in theirs])
    identical = np.array_equal(ours_flat, theirs_flat)
    n_tok = len(ours_flat) - len(docs)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{len(docs):,} documents, {sum(map(len, docs)):,} chars, {n_tok:,} tokens; "
          f"{os.cpu_count()} cores, load average {load:.2f}")
    print(f"prepare path (tiktoken, {tok.num_threads} threads): {t_ours:.3f} s  {n_tok / t_ours:>12,.0f} tok/s")
    print(f"HF tokenizers encode_batch ({ref_name}): {t_ref:.3f} s  {n_tok / t_ref:>12,.0f} tok/s")
    print(f"speedup {t_ref / t_ours:.2f}x, identical ids: {identical}")
    if not identical:
        sys.exit("ids differ")


if __name__ == "__main__":
    main()
