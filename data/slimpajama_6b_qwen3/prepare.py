"""SlimPajama-6B (or local files) as Qwen3 uint32 shards for UL2 training.

    python data/slimpajama_6b_qwen3/prepare.py                          # stream DKYoon/SlimPajama-6B
    python data/slimpajama_6b_qwen3/prepare.py --input a.txt b.jsonl --out /tmp/mydata

From the hub, train comes from the dataset's "train" split and val from its "validation"
split (streamed with `datasets`; nothing is stored besides the shards). Local inputs: a
.jsonl file holds one JSON object with a "text" field per line, any other file is one
plain-text document; every --val_every-th document (starting with the first) goes to val.
Documents are tokenized in parallel, each followed by <|endoftext|>, into fixed-size uint32
shards plus meta.json. Rerunning the same command resumes where a killed run stopped.
"""
import argparse
import os
import shlex
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from shards import ShardError, check_inputs, input_source, local_splits, prepare  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def hub_splits(name, splits, max_docs):
    def split_docs(hub_split):
        def docs_from(start):
            if max_docs is not None and start >= max_docs:
                return
            try:
                from datasets import load_dataset
            except ImportError:
                raise ShardError("the `datasets` package is missing: pip install datasets, "
                                 "or pass local files with --input FILE...") from None
            try:
                ds = load_dataset(name, split=hub_split, streaming=True)
                for i, row in enumerate(ds.skip(start) if start else ds, start):
                    if max_docs is not None and i >= max_docs:
                        break
                    yield row["text"]
            except Exception as e:  # network, hub or schema errors all end the run the same way
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ShardError(f"{name} ({hub_split} split): {msg}; "
                                 "offline? pass local files with --input FILE...") from None
        return docs_from
    return {ours: split_docs(theirs) for ours, theirs in splits.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=HERE, help="output directory for *.bin and meta.json")
    parser.add_argument("--input", nargs="+", metavar="FILE", help="local .txt/.jsonl files instead of the hub")
    parser.add_argument("--val_every", type=int, default=100, help="local input: every N-th document goes to val")
    parser.add_argument("--max_docs", type=int, default=None, help="at most this many documents per split")
    parser.add_argument("--tokens_per_shard", type=int, default=100_000_000, help="tokens per .bin file (4 bytes each)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer threads")
    parser.add_argument("--tokenizer", default=None, help="Hugging Face tokenizer dir or hub name to use "
                        "instead of the offline tiktoken Qwen3 tokenizer (same ids)")
    parser.add_argument("--dataset", default="DKYoon/SlimPajama-6B", help="hub dataset")
    parser.add_argument("--train_split", default="train", help="hub split used for train")
    parser.add_argument("--val_split", default="validation", help="hub split used for val")
    args = parser.parse_args()
    try:
        if args.val_every < 2:
            raise ShardError(f"--val_every must be at least 2, got {args.val_every}")
        if args.workers < 1 or (args.max_docs is not None and args.max_docs < 1):
            raise ShardError("--workers and --max_docs must be positive")
        if args.input:
            check_inputs(args.input)
        os.environ.setdefault("RAYON_NUM_THREADS", str(args.workers))  # a Hugging Face tokenizer's pool
        try:
            tokenizer = load_tokenizer(args.tokenizer)
        except ValueError as e:
            raise ShardError(str(e)) from None
        tokenizer.num_threads = args.workers
        if args.input:
            splits = local_splits(args.input, args.val_every, args.max_docs)
            source = input_source(args.input, val_every=args.val_every, max_docs=args.max_docs)
        else:
            split_map = {"train": args.train_split, "val": args.val_split}
            splits = hub_splits(args.dataset, split_map, args.max_docs)
            source = {"dataset": args.dataset, "splits": split_map, "max_docs": args.max_docs}
        prepare(args.out, splits, tokenizer, args.tokens_per_shard, source,
                command=" ".join(["python"] + [shlex.quote(a) for a in sys.argv]))
    except (ShardError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; rerun the same command to resume")


if __name__ == "__main__":
    main()
