"""A small SFT set of conversations from SQuAD v1.1 (question + passage -> answer) for masked-diffusion SFT.

    python data/squad_sft/prepare.py [--input squad_train_subset_v1.1.json] [--out DIR] [--val_every 10]

Each question becomes one record in the conversation format diffusion.read_conversations reads:

    {"system": "...", "conversations": [{"from": "human", "value": "<passage>\\n\\nQuestion: <question>"},
                                        {"from": "gpt", "value": "<first answer>"}]}

Whole articles go to one split (every val_every-th article by title order is validation), so no passage is
in both. Output: train.jsonl and val.jsonl in DIR (default: this script's directory), each written to a .tmp
file and renamed. The input defaults to ../shared/data/qa/squad_train_subset_v1.1.json (or
$QWEN_ENCDEC_SHARED_DATA/qa/...).
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SYSTEM = "Answer the question with a short span copied from the passage."


def default_input():
    shared = os.environ.get("QWEN_ENCDEC_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))
    return os.path.join(shared, "qa", "squad_train_subset_v1.1.json")


def records(squad, val_every):
    """(train, val) lists of conversation records from a parsed SQuAD v1.1 file."""
    train, val = [], []
    articles = sorted(squad["data"], key=lambda a: a["title"])
    for i, article in enumerate(articles):
        split = val if val_every and i % val_every == val_every - 1 else train
        for para in article["paragraphs"]:
            context = para["context"].strip()
            for qa in para["qas"]:
                if not qa.get("answers"):
                    continue
                human = f"{context}\n\nQuestion: {qa['question'].strip()}"
                split.append({"system": SYSTEM, "conversations": [{"from": "human", "value": human},
                                                                  {"from": "gpt", "value": qa["answers"][0]["text"]}]})
    return train, val


def write_jsonl(path, recs):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", default=default_input(), help="a SQuAD v1.1 JSON file")
    p.add_argument("--out", default=HERE, help="output directory")
    p.add_argument("--val_every", type=int, default=10, help="every N-th article is validation (0 = none)")
    args = p.parse_args(argv)
    try:
        with open(args.input, encoding="utf-8") as f:
            squad = json.load(f)
        train, val = records(squad, args.val_every)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"prepare.py: {args.input}: cannot read SQuAD JSON ({type(e).__name__}: {e}); pass --input FILE")
    except (KeyError, TypeError) as e:
        sys.exit(f"prepare.py: {args.input}: not SQuAD v1.1 (missing {e}); pass a SQuAD v1.1 file with --input")
    os.makedirs(args.out, exist_ok=True)
    write_jsonl(os.path.join(args.out, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out, "val.jsonl"), val)
    print(f"{len(train)} train and {len(val)} val conversations in {args.out}/train.jsonl, val.jsonl")


if __name__ == "__main__":
    main()
