"""Tiny Shakespeare as Qwen3 uint32 shards: the dataset the tiny default config trains on.

    python data/shakespeare_qwen3/prepare.py [TEXT_FILE] [--out DIR]

The text comes from TEXT_FILE, else ../shared/data/corpus/tiny_shakespeare.txt (or
$QWEN_ENCDEC_SHARED_DATA/corpus/...), else it is downloaded from karpathy/char-rnn. As in
nanoGPT the last ~10% of the text (cut at a line break) is the val split; each split is one
document followed by <|endoftext|>. Output: train_*.bin, val_*.bin and meta.json in DIR
(default: this script's directory).
"""
import argparse
import hashlib
import os
import shlex
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from shards import ShardError, prepare  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def load_text(path):
    shared = os.environ.get("QWEN_ENCDEC_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))
    shared = os.path.join(shared, "corpus", "tiny_shakespeare.txt")
    for candidate in (path, shared):
        if candidate and (candidate == path or os.path.exists(candidate)):
            try:
                with open(candidate, encoding="utf-8") as f:
                    return f.read(), candidate
            except UnicodeDecodeError as e:
                raise ShardError(f"{candidate}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    import urllib.request
    print(f"{shared} not found; downloading {URL}")
    try:
        with urllib.request.urlopen(URL, timeout=30) as r:
            return r.read().decode("utf-8"), URL
    except OSError as e:
        raise ShardError(f"{shared} not found and downloading {URL} failed ({e}); "
                         "pass a text file: python data/shakespeare_qwen3/prepare.py FILE") from None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("text_file", nargs="?", help="plain UTF-8 text (default: the shared Tiny Shakespeare)")
    parser.add_argument("--out", default=HERE, help="output directory (default: %(default)s)")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="tail fraction of the text used as val")
    parser.add_argument("--tokens_per_shard", type=int, default=100_000_000, help="tokens per .bin file")
    args = parser.parse_args()
    try:
        if not 0 < args.val_fraction < 1:
            raise ShardError(f"--val_fraction must be in (0, 1), got {args.val_fraction}")
        text, origin = load_text(args.text_file)
        cut = text.rfind("\n", 0, round(len(text) * (1 - args.val_fraction))) + 1
        if not 0 < cut < len(text):
            raise ShardError(f"{origin}: too short to split into train and val")
        parts = {"train": [text[:cut]], "val": [text[cut:]]}
        source = {"text_sha256": hashlib.sha256(text.encode()).hexdigest()[:16], "val_fraction": args.val_fraction}
        prepare(args.out, {s: (lambda start, docs=docs: iter(docs[start:])) for s, docs in parts.items()},
                load_tokenizer(), args.tokens_per_shard, source,
                command=" ".join(["python"] + [shlex.quote(a) for a in sys.argv]))
    except (ShardError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; rerun the same command to resume")


if __name__ == "__main__":
    main()
