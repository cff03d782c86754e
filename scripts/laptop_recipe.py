"""The whole recipe at laptop scale, on CPU, with nothing downloaded:

  1. pretrain a small Qwen3-architecture decoder (causal LM) from scratch on offline text
  2. export it in Hugging Face format (Qwen3.save_pretrained) and check transformers gives the same logits
  3. convert it to an encoder-decoder (init_from='qwen3') and train with the default UL2 mixture
  4. sample a few span infillings
  5. extract the encoder and evaluate on STS-B dev against the source decoder (mean and last-token
     pooling) and a randomly initialised encoder of the same shape
  6. write a markdown table of every number (results.md in the output directory)

    python scripts/laptop_recipe.py                 # about 40 minutes on 2 cores
    python scripts/laptop_recipe.py --fast          # tiny sizes, a few minutes: the pipeline's contracts

Every stage is an ordinary command of this project, printed before it runs; a stage whose output
exists is skipped, so a rerun continues where a killed run stopped (--fresh starts over).
The text: Tiny Shakespeare (one document per paragraph) and the STS-B *train* sentences as unlabelled
text (one document per sentence). STS-B dev and test never enter training.
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from train import list_checkpoints  # noqa: E402  (the repo root is on the path only now)

# fast mode: the same stages at toy sizes (the test suite runs this)
FAST_DECODER = ["--model_overrides={'hidden_size': 64, 'intermediate_size': 128, 'num_layers': 2, 'num_heads': 4, "
                "'num_kv_heads': 2, 'head_dim': 16, 'max_seq_len': 512}", "--max_iters=30", "--batch_size=8",
                "--dec_len=64", "--eval_interval=15", "--eval_iters=2", "--log_interval=10", "--warmup_iters=5"]
FAST_UL2 = ["--max_iters=20", "--batch_size=4", "--enc_len=64", "--dec_len=64", "--eval_interval=10",
            "--eval_iters=2", "--log_interval=5", "--warmup_iters=5"]
SAMPLE_PROMPTS = ["ROMEO: O, she doth teach the <extra_id_0> to burn bright!",
                  "First Citizen: We are accounted poor <extra_id_0>, the patricians good.",
                  "A man is playing a <extra_id_0>.",
                  "A woman is <extra_id_0> in the kitchen."]


def run(cmd, log=None):
    """Run one stage, streaming its output (and saving it to `log`); stop the recipe if it fails."""
    print("+ " + " ".join(cmd), flush=True)
    t, lines = time.time(), []
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            lines.append(line)
            print("  " + line, end="", flush=True)
    if log:
        with open(log, "w") as f:
            f.writelines(lines)
    if proc.returncode:
        sys.exit(f"laptop_recipe: stage failed ({' '.join(cmd[:2])}), exit {proc.returncode}; see the output above")
    return "".join(lines), time.time() - t


def write_corpus(path, shared, fast):
    """Shakespeare paragraphs and STS-B train sentences as JSONL documents."""
    with open(os.path.join(shared, "corpus", "tiny_shakespeare.txt"), encoding="utf-8") as f:
        paragraphs = [p.strip() for p in f.read().split("\n\n") if p.strip()]
    sentences = []
    with open(os.path.join(shared, "sts", "stsb_train.tsv"), encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            sentences += [row["sentence1"], row["sentence2"]]
    sentences = list(dict.fromkeys(sentences))  # unique, in file order
    if fast:
        paragraphs, sentences = paragraphs[:800], sentences[:1500]
    # interleave the two sources so the val split (every 20th document) holds both
    docs, step = [], max(len(sentences) // max(len(paragraphs), 1), 1)
    for i, p in enumerate(paragraphs):
        docs += [p] + sentences[i * step:(i + 1) * step]
    docs += sentences[len(paragraphs) * step:]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    os.replace(path + ".tmp", path)
    return len(paragraphs), len(sentences)


def train_summary(out_dir, wall):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    train = [r for r in recs if "loss" in r]
    val = [r for r in recs if "val_loss" in r]
    speeds = [r["tok_per_s"] for r in train[1:]] or [r["tok_per_s"] for r in train]
    return {"iters": train[-1]["iter"], "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"],
            "val_first": val[0]["val_loss"] if val else None, "val_last": val[-1]["val_loss"] if val else None,
            "tok_per_s": sorted(speeds)[len(speeds) // 2], "wall_s": wall}


def export_decoder(ckpt, out):
    """Stage 2: Qwen3.save_pretrained, then transformers must give the same logits."""
    import torch
    from transformers import Qwen3ForCausalLM

    from model import Qwen3
    ours = Qwen3.from_pretrained(ckpt).eval()
    ours.save_pretrained(out)
    hf = Qwen3ForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[9707, 1879, 11, 358, 1079, 264, 1273, 13]])  # "Hello world, I am a test."
    with torch.no_grad():
        diff = (hf(input_ids=ids).logits - ours(ids)[0]).abs().max().item()
    if diff > 1e-4:
        sys.exit(f"laptop_recipe: transformers' logits differ from ours by {diff:.2e} on {out}")
    return diff


def random_encoder(like_ckpt, out):
    """A randomly initialised encoder-decoder of the same shape (the no-training baseline)."""
    import torch

    from model import EncoderDecoder
    cfg = EncoderDecoder.from_pretrained(like_ckpt).cfg
    torch.manual_seed(0)
    EncoderDecoder(cfg).save_pretrained(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/laptop", help="everything the recipe writes goes here")
    ap.add_argument("--shared", default=os.environ.get("QWEN_ENCDEC_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data")),
                    help="the shared data directory (corpus/, sts/)")
    ap.add_argument("--fast", action="store_true", help="toy sizes: checks the pipeline in a few minutes")
    ap.add_argument("--fresh", action="store_true", help="delete --out first")
    args = ap.parse_args()
    for need in ("corpus/tiny_shakespeare.txt", "sts/stsb_train.tsv", "sts/stsb_dev.tsv"):
        if not os.path.isfile(os.path.join(args.shared, need)):
            sys.exit(f"laptop_recipe: {os.path.join(args.shared, need)} not found; pass --shared DIR")
    out = os.path.abspath(args.out)
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    data, dec_out, hf_dir, ul2_out = (os.path.join(out, n) for n in ("data", "decoder", "qwen3_decoder", "ul2"))
    enc_dir, rnd_ckpt, rnd_dir = (os.path.join(out, n) for n in ("encoder", "random_ckpt", "random_encoder"))
    report = {"fast": args.fast}
    t0 = time.time()

    # 0. text -> shards
    if not os.path.isfile(os.path.join(data, "meta.json")):
        corpus = os.path.join(out, "corpus.jsonl")
        n_par, n_sent = write_corpus(corpus, args.shared, args.fast)
        print(f"corpus: {n_par} Shakespeare paragraphs + {n_sent} STS-B train sentences", flush=True)
        run([py, "data/slimpajama_6b_qwen3/prepare.py", "--input", corpus, "--out", data, "--val_every", "20"])
    with open(os.path.join(data, "meta.json")) as f:
        meta = json.load(f)
    report["tokens"] = {s: meta["splits"][s]["num_tokens"] for s in ("train", "val")}

    # 1. pretrain the decoder
    fast_dec = FAST_DECODER if args.fast else []
    if not list_checkpoints(dec_out):
        shutil.rmtree(dec_out, ignore_errors=True)
        _, wall = run([py, "train.py", "config/laptop_decoder.py", f"--out_dir={dec_out}", f"--data_dir={data}",
                       *fast_dec], log=os.path.join(out, "decoder.log"))
        report["decoder_wall_s"] = wall
    report["decoder"] = train_summary(dec_out, report.get("decoder_wall_s"))

    # 2. export in Hugging Face format, checked against transformers
    report["export_max_abs_diff"] = export_decoder(list_checkpoints(dec_out)[-1], hf_dir)
    print(f"exported {hf_dir}: transformers logits match (max abs diff {report['export_max_abs_diff']:.1e})")

    # 3. UL2 from the decoder
    if not list_checkpoints(ul2_out):
        shutil.rmtree(ul2_out, ignore_errors=True)
        _, wall = run([py, "train.py", "config/laptop_ul2.py", f"--out_dir={ul2_out}", f"--data_dir={data}",
                       f"--qwen3_path={hf_dir}", *(FAST_UL2 if args.fast else [])], log=os.path.join(out, "ul2.log"))
        report["ul2_wall_s"] = wall
    report["ul2"] = train_summary(ul2_out, report.get("ul2_wall_s"))

    # 4. span infilling
    prompts = os.path.join(out, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("\n".join(SAMPLE_PROMPTS) + "\n")
    samples, _ = run([py, "sample.py", "--ckpt", ul2_out, "--max_new_tokens", "16", "--prompt_file", prompts])
    report["samples"] = [line for line in samples.splitlines()
                         if line and not line.startswith(("#", "-" * 10, "sampling"))]

    # 5. extract and evaluate on STS-B dev
    if not os.path.isdir(enc_dir):
        run([py, "extract.py", "--ckpt", ul2_out, "--out", enc_dir, "--pooling", "mean", "--verify"])
    if not os.path.isdir(rnd_dir):
        random_encoder(list_checkpoints(ul2_out)[-1], rnd_ckpt)
        run([py, "extract.py", "--ckpt", rnd_ckpt, "--out", rnd_dir, "--pooling", "mean"])
    results = os.path.join(out, "sts_results.json")  # eval_embed.py writes its own table beside it
    if os.path.exists(results):
        os.remove(results)
    models = {"UL2 encoder (mean)": f"ours:{enc_dir}", "source decoder, causal (mean)": f"qwen3:{hf_dir}:mean",
              "source decoder, causal (last token)": f"qwen3:{hf_dir}:last",
              "random encoder, same shape (mean)": f"ours:{rnd_dir}"}
    run([py, "eval_embed.py", *[a for m in models.values() for a in ("--model", m)],
         "--sts", os.path.join(args.shared, "sts", "stsb_dev.tsv"), "--out", results])
    with open(results) as f:
        scores = json.load(f)
    report["sts"] = {name: scores[spec]["stsb_dev.tsv"] for name, spec in models.items()}
    report["total_wall_s"] = time.time() - t0

    # 6. the table
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    write_markdown(report, os.path.join(out, "results.md"))
    print(open(os.path.join(out, "results.md")).read())


def write_markdown(r, path):
    lines = ["# Laptop recipe results" + (" (--fast: toy sizes, not a quality result)" if r["fast"] else ""), "",
             "STS-B dev (1,500 pairs), cosine similarity, x100:", "",
             "| model | Spearman | Pearson |", "| --- | ---: | ---: |"]
    for name, m in r["sts"].items():
        lines.append(f"| {name} | {m['spearman']:.2f} | {m['pearson']:.2f} |")
    lines += ["", "Training (CPU; losses are cross-entropy over the trimmed vocabulary):", "",
              "| stage | iters | first loss | last loss | val loss (start → end) | tokens/s (median) | wall |",
              "| --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for stage in ("decoder", "ul2"):
        s = r[stage]
        wall = f"{s['wall_s'] / 60:.1f} min" if s["wall_s"] else "(earlier run)"
        val = f"{s['val_first']:.3f} → {s['val_last']:.3f}" if s["val_last"] is not None else "n/a"
        lines.append(f"| {'1. causal decoder' if stage == 'decoder' else '3. UL2 encoder-decoder'} | {s['iters']} | "
                     f"{s['first_loss']:.3f} | {s['last_loss']:.3f} | {val} | {s['tok_per_s']:,.0f} | {wall} |")
    lines += ["", f"Corpus tokens: {r['tokens']}. Export check: transformers vs ours max |logit diff| "
              f"{r['export_max_abs_diff']:.1e}. Total wall time {r['total_wall_s'] / 60:.1f} min.", "",
              "Span infilling (greedy):", ""]
    lines += [f"    {s}" for s in r["samples"]]
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
