"""The whole recipe at laptop scale, on CPU, with nothing downloaded: what each step buys an embedding model.

  0. English Wikipedia text (../shared/data/corpus/enwiki_train.txt, a prefix of it; enwiki_valid.txt
     for validation) -> uint32 shards (data/slimpajama_6b_qwen3/prepare.py --input)
  1. pretrain a Qwen3-architecture decoder from scratch (objective=causal, trim_vocab): the Qwen3-0.6B stand-in
  2. export it as a Hugging Face Qwen3 directory and check that transformers gives the same logits
  3. convert it to an encoder-decoder (init_from=qwen3) and train with the default UL2 mixture
  4. sample a few span infillings
  5. the SAME contrastive stage (config/laptop_contrastive.py: SNLI pairs, in-batch negatives, Matryoshka
     dims; same data, steps and seeds) from three starting points: a random init of the same shape, the
     causal decoder (its HF directory, bidirectional) and the UL2 encoder; two seeds each
  6. extract every encoder (extract.py; --verify on the final one) and score STS-B dev with eval_embed.py,
     beside the raw encoders and all-MiniLM-L6-v2; STS-B test once, for the final model only
  7. results.md + report.json in --out

    python scripts/laptop_recipe.py                 # <= 90 minutes on 2 idle cores
    python scripts/laptop_recipe.py --fast          # toy sizes, a few minutes: the pipeline's contracts

Every stage is an ordinary command of this project, printed before it runs; a stage whose output exists is
skipped, so a rerun continues where a killed run stopped (--fresh starts over). STS-B dev/test and SNLI dev
never enter training (SNLI dev is the contrastive stage's validation loss).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402  (the repo root is on the path only now)

# How much Wikipedia to tokenize: a little more than the decoder reads (1600 x 8 x 256 = 3.28M tokens; 18 MB
# give 3.84M), so no window repeats; more text would only grow the trimmed vocabulary (the LM head: ~42K rows
# at 8 MB, 51K at 18 MB, 57K at 40 MB) without being read. MB of enwiki_train.txt from its start.
TRAIN_MB = 18
FAST_TRAIN_MB = 1.0
# fast mode: the same stages at toy sizes (the test suite runs this)
FAST_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "head_dim": 16, "max_seq_len": 512}
FAST_DECODER = [f"--model_overrides={FAST_SHAPE}", "--max_iters=30", "--batch_size=8", "--dec_len=64",
                "--eval_interval=15", "--eval_iters=2", "--log_interval=10", "--warmup_iters=5"]
FAST_UL2 = ["--max_iters=20", "--batch_size=4", "--enc_len=64", "--dec_len=64", "--eval_interval=10",
            "--eval_iters=2", "--log_interval=5", "--warmup_iters=5"]
FAST_CONTRASTIVE = ["--max_iters=12", "--batch_size=16", "--eval_interval=6", "--eval_iters=2", "--log_interval=4",
                    "--warmup_iters=2", "--contrastive_matryoshka_dims=[64, 32, 16]"]
SEEDS = (1, 2)
STARTS = {  # row label -> run name
    "random init + contrastive": "random",
    "causal decoder + contrastive": "causal",
    "UL2 encoder + contrastive": "ul2",
}
SAMPLE_PROMPTS = ["The <extra_id_0> is the capital of <extra_id_1>.",
                  "In 1905, Albert Einstein published <extra_id_0> on the photoelectric effect.",
                  "A man is playing a <extra_id_0>.",
                  "The river flows <extra_id_0> into the sea."]


def run(cmd, log=None):
    """Run one stage, streaming its output (and saving it to `log`); stop the recipe if it fails."""
    print("+ " + " ".join(cmd), flush=True)
    t, lines = time.time(), []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env) as proc:
        for line in proc.stdout:
            lines.append(line)
            print("  " + line, end="", flush=True)
    if log:
        with open(log, "w") as f:
            f.writelines(lines)
    if proc.returncode:
        sys.exit(f"laptop_recipe: stage failed ({' '.join(cmd[:3])}), exit {proc.returncode}; see the output above")
    return "".join(lines), time.time() - t


def read_articles(path, max_bytes=None):
    """Wikipedia articles of a corpus file (title line, blank line, one paragraph per line; articles separated
    by a blank line): a one-line block is a title or heading and opens the next block's document."""
    with open(path, encoding="utf-8") as f:
        text = f.read(int(max_bytes)) if max_bytes else f.read()
    if max_bytes:  # stop at an article boundary
        text = text[:text.rfind("\n\n")]
    docs, title = [], None
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        if "\n" not in block and len(block) < 200 and title is None:
            title = block
            continue
        docs.append(f"{title}\n\n{block}" if title else block)
        title = None
    return docs


def write_corpus(path, shared, train_mb):
    """Train articles (the first train_mb MB of enwiki_train.txt) and every enwiki_valid.txt article as JSONL,
    ordered so that prepare.py --val_every V sends exactly the valid articles to val: they sit at positions
    0, V, 2V, ... Returns (V, train articles, valid articles)."""
    train = read_articles(os.path.join(shared, "corpus", "enwiki_train.txt"), train_mb * 1e6)
    valid = read_articles(os.path.join(shared, "corpus", "enwiki_valid.txt"))
    if train_mb < 5:  # toy runs: a few valid articles are validation enough
        valid = valid[:max(4, len(train) // 20)]
    every = max(2, len(train) // len(valid) + 1)
    train = train[:len(valid) * (every - 1)]  # exactly every-1 train articles after each valid one
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for i, v in enumerate(valid):
            for d in [v] + train[i * (every - 1):(i + 1) * (every - 1)]:
                f.write(json.dumps({"text": d}) + "\n")
    os.replace(path + ".tmp", path)
    return every, len(train), len(valid)


def train_summary(out_dir, wall):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    train = [r for r in recs if "loss" in r]
    val = [r for r in recs if "val_loss" in r]
    speeds = [r["tok_per_s"] for r in train[1:]] or [r["tok_per_s"] for r in train]
    return {"iters": train[-1]["iter"], "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"],
            "val_first": val[0]["val_loss"] if val else None, "val_last": val[-1]["val_loss"] if val else None,
            "val_groups_first": {k[4:]: v for k, v in val[0].items() if k.startswith("val/")} if val else {},
            "val_groups_last": {k[4:]: v for k, v in val[-1].items() if k.startswith("val/")} if val else {},
            "tok_per_s": sorted(speeds)[len(speeds) // 2], "wall_s": wall}


def export_decoder(ckpt, out):
    """Stage 2: Qwen3.save_pretrained, then transformers must give the same logits."""
    import torch
    from transformers import Qwen3ForCausalLM

    from model import Qwen3
    ours = Qwen3.from_pretrained(ckpt).eval()
    ours.save_pretrained(out + ".tmp")
    hf = Qwen3ForCausalLM.from_pretrained(out + ".tmp").eval()
    ids = torch.tensor([[785, 6722, 315, 9625, 374, 12095, 13, 1084]])  # "The capital of France is Paris. It"
    with torch.no_grad():
        diff = (hf(input_ids=ids).logits - ours(ids)[0]).abs().max().item()
    if diff > 1e-4:
        sys.exit(f"laptop_recipe: transformers' logits differ from ours by {diff:.2e} on {out}.tmp")
    with open(os.path.join(out + ".tmp", "export_check.json"), "w") as f:
        json.dump({"max_abs_logit_diff": diff}, f)
    checkpoint.publish(out + ".tmp", out)
    return diff


def random_encoder(like_ckpt, out, seed=0):
    """A randomly initialised encoder-decoder of the same shape (the no-training baseline)."""
    import torch

    from model import EncoderDecoder
    cfg = EncoderDecoder.from_pretrained(like_ckpt).cfg
    torch.manual_seed(seed)
    EncoderDecoder(cfg).save_pretrained(out)


def train_stage(py, config, out_dir, args, log, done):
    """train.py CONFIG --out_dir=OUT ARGS unless OUT already holds a finished run; returns its summary."""
    if not (checkpoint.list_checkpoints(out_dir) and os.path.isfile(os.path.join(out_dir, "done.json"))):
        shutil.rmtree(out_dir, ignore_errors=True)
        _, wall = run([py, "train.py", config, f"--out_dir={out_dir}", *args], log=log)
        with open(os.path.join(out_dir, "done.json"), "w") as f:
            json.dump({"wall_s": wall}, f)
    with open(os.path.join(out_dir, "done.json")) as f:
        wall = json.load(f)["wall_s"]
    done[out_dir] = train_summary(out_dir, wall)
    return done[out_dir]


def evaluate(py, models, sts, results, dims=()):
    """eval_embed.py on the models (spec list) that `results` does not score on `sts` yet; returns the scores."""
    task = os.path.basename(sts)
    scores = json.load(open(results)) if os.path.isfile(results) else {}
    todo = [m for m in models if task not in scores.get(m, {}) or any(task not in scores.get(f"{m}@{d}", {})
                                                                      for d in dims)]
    if todo:
        run([py, "eval_embed.py", *[a for m in todo for a in ("--model", m)], "--sts", sts, "--out", results,
             *(["--dims", ",".join(str(d) for d in dims)] if dims else [])])
        scores = json.load(open(results))
    return {m: scores[m][task] for m in scores if task in scores[m]}


def mean(xs):
    return sum(xs) / len(xs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/laptop", help="everything the recipe writes goes here")
    ap.add_argument("--shared", default=os.environ.get("QWEN_ENCDEC_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data")),
                    help="the shared data directory (corpus/, nli/, sts/)")
    ap.add_argument("--fast", action="store_true", help="toy sizes: checks the pipeline in a few minutes")
    ap.add_argument("--fresh", action="store_true", help="delete --out first")
    ap.add_argument("--train_mb", type=float, default=None, help=f"MB of enwiki_train.txt to tokenize "
                    f"(default {TRAIN_MB}, --fast {FAST_TRAIN_MB})")
    ap.add_argument("--no_minilm", action="store_true", help="leave out the all-MiniLM-L6-v2 reference row")
    args = ap.parse_args()
    need = ["corpus/enwiki_train.txt", "corpus/enwiki_valid.txt", "nli/snli_train_subset.tsv", "nli/snli_dev.tsv",
            "sts/stsb_dev.tsv", "sts/stsb_test.tsv"]
    for n in need:
        if not os.path.isfile(os.path.join(args.shared, n)):
            sys.exit(f"laptop_recipe: {os.path.join(args.shared, n)} not found; pass --shared DIR")
    shared = os.path.abspath(args.shared)
    out = os.path.abspath(args.out)
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    p = lambda *n: os.path.join(out, *n)  # noqa: E731
    data, dec_out, hf_dir, ul2_out = p("data"), p("decoder"), p("qwen3_decoder"), p("ul2")
    enc_dir, rnd_ckpt, rnd_dir = p("encoders", "ul2"), p("random_ckpt"), p("encoders", "random")
    train_mb = args.train_mb or (FAST_TRAIN_MB if args.fast else TRAIN_MB)
    report = {"fast": args.fast, "train_mb": train_mb, "stages": {}}
    t0 = time.time()

    # 0. text -> shards
    if not os.path.isfile(os.path.join(data, "meta.json")):
        corpus = p("corpus.jsonl")
        every, n_train, n_valid = write_corpus(corpus, shared, train_mb)
        print(f"corpus: {n_train} enwiki_train articles (first {train_mb} MB) + {n_valid} enwiki_valid articles "
              f"(every {every}th document: the val split)", flush=True)
        run([py, "data/slimpajama_6b_qwen3/prepare.py", "--input", corpus, "--out", data, "--val_every", str(every)])
    with open(os.path.join(data, "meta.json")) as f:
        meta = json.load(f)
    report["tokens"] = {s: meta["splits"][s]["num_tokens"] for s in ("train", "val")}

    # 1. pretrain the decoder
    done = {}
    report["stages"]["decoder"] = train_stage(py, "config/laptop_decoder.py", dec_out,
                                              [f"--data_dir={data}", *(FAST_DECODER if args.fast else [])],
                                              p("decoder.log"), done)

    # 2. export in Hugging Face format, checked against transformers
    if not os.path.isfile(os.path.join(hf_dir, "export_check.json")):
        shutil.rmtree(hf_dir + ".tmp", ignore_errors=True)
        print(f"+ Qwen3.from_pretrained({checkpoint.newest(dec_out)}).save_pretrained({hf_dir}); "
              "transformers' Qwen3ForCausalLM must give the same logits", flush=True)
        export_decoder(checkpoint.newest(dec_out), hf_dir)
    with open(os.path.join(hf_dir, "export_check.json")) as f:
        report["export_max_abs_diff"] = json.load(f)["max_abs_logit_diff"]
    print(f"exported {hf_dir}: transformers' logits match (max abs diff {report['export_max_abs_diff']:.1e})")

    # 3. UL2 from the decoder
    report["stages"]["ul2"] = train_stage(py, "config/laptop_ul2.py", ul2_out,
                                          [f"--data_dir={data}", f"--qwen3_path={hf_dir}",
                                           *(FAST_UL2 if args.fast else [])], p("ul2.log"), done)

    # 4. span infilling
    prompts = p("prompts.txt")
    with open(prompts, "w") as f:
        f.write("\n".join(SAMPLE_PROMPTS) + "\n")
    samples, _ = run([py, "sample.py", "--ckpt", ul2_out, "--max_new_tokens", "16", "--prompt_file", prompts])
    report["samples"] = [line for line in samples.splitlines()
                         if line and not line.startswith(("#", "-" * 10, "sampling"))]

    # 5. the same contrastive stage from three starting points, two seeds each
    fast_con = FAST_CONTRASTIVE if args.fast else []
    nli = [f"--contrastive_data={shared}/nli/snli_train_subset.tsv", f"--contrastive_val_data={shared}/nli/snli_dev.tsv"]
    shape = FAST_SHAPE if args.fast else decoder_shape()
    starts = {"random": ["--init_from=scratch", "--model_preset=tiny", f"--model_overrides={shape}"],
              "causal": ["--init_from=qwen3", f"--qwen3_path={hf_dir}"],
              "ul2": ["--init_from=pretrained", f"--init_path={ul2_out}"]}
    con = {}
    for name, start in starts.items():
        for seed in SEEDS:
            run_dir = p("contrastive", f"{name}-s{seed}")
            report["stages"][f"contrastive {name} seed {seed}"] = train_stage(
                py, "config/laptop_contrastive.py", run_dir, [*start, f"--seed={seed}", *nli, *fast_con],
                p("contrastive", f"{name}-s{seed}.log"), done)
            con[name, seed] = run_dir

    # 6. extract the encoders
    if not os.path.isdir(enc_dir):
        run([py, "extract.py", "--ckpt", ul2_out, "--out", enc_dir, "--pooling", "mean"])
    if not os.path.isdir(rnd_dir):
        shutil.rmtree(rnd_ckpt, ignore_errors=True)
        random_encoder(checkpoint.newest(ul2_out), rnd_ckpt)
        run([py, "extract.py", "--ckpt", rnd_ckpt, "--out", rnd_dir, "--pooling", "mean"])
        shutil.rmtree(rnd_ckpt, ignore_errors=True)
    final = ("ul2", SEEDS[0])
    enc = {}
    for key, run_dir in con.items():
        enc[key] = p("encoders", f"{key[0]}-s{key[1]}")
        if not os.path.isdir(enc[key]):  # the final model's export is checked three ways
            run([py, "extract.py", "--ckpt", run_dir, "--out", enc[key], *(["--verify"] if key == final else [])])

    # 7. STS-B dev for every model, Matryoshka widths of the UL2 runs, STS-B test for the final model
    dev, test = os.path.join(shared, "sts", "stsb_dev.tsv"), os.path.join(shared, "sts", "stsb_test.tsv")
    results = p("sts_results.json")  # eval_embed.py writes its own table beside it
    raw = {("random encoder", "mean"): f"ours:{rnd_dir}", ("causal decoder", "mean"): f"qwen3:{hf_dir}:mean",
           ("causal decoder", "last"): f"qwen3:{hf_dir}:last", ("UL2 encoder", "mean"): f"ours:{enc_dir}"}
    if not args.no_minilm:
        raw["all-MiniLM-L6-v2", "mean"] = "all-MiniLM-L6-v2"
    dims = json.load(open(os.path.join(enc[final], "config.json")))["matryoshka_dims"]
    scores = evaluate(py, list(raw.values()) + [f"ours:{e}" for k, e in enc.items() if k[0] != "ul2"], dev, results)
    scores.update(evaluate(py, [f"ours:{e}" for k, e in enc.items() if k[0] == "ul2"], dev, results, dims))
    test_scores = evaluate(py, [f"ours:{enc[final]}"], test, results)
    rows = []
    for (label, pooling), spec in raw.items():
        rows.append({"model": label, "pooling": pooling, "dim": None, "runs": [scores[spec]]})
    width = json.load(open(os.path.join(enc[final], "config.json")))["hidden_size"]
    for label, name in STARTS.items():
        rows.append({"model": label, "pooling": "mean", "dim": width,
                     "runs": [scores[f"ours:{enc[name, s]}"] for s in SEEDS]})
    for d in dims:
        rows.append({"model": "UL2 encoder + contrastive", "pooling": "mean", "dim": d,
                     "runs": [scores[f"ours:{enc['ul2', s]}@{d}"] for s in SEEDS]})
    for r in rows:
        r["spearman"] = mean([x["spearman"] for x in r["runs"]])
        r["pearson"] = mean([x["pearson"] for x in r["runs"]])
    report["sts_dev"] = rows
    report["sts_test_final"] = {"model": f"UL2 encoder + contrastive (seed {final[1]})",
                                **test_scores[f"ours:{enc[final]}"]}
    report["final_encoder"] = enc[final]
    report["total_wall_s"] = time.time() - t0
    report["stage_wall_s"] = sum(s["wall_s"] for s in report["stages"].values())

    # 8. the table
    with open(p("report.json.tmp"), "w") as f:
        json.dump(report, f, indent=1)
    os.replace(p("report.json.tmp"), p("report.json"))
    write_markdown(report, p("results.md"))
    print(open(p("results.md")).read())


def decoder_shape():
    """The decoder's shape from config/laptop_decoder.py (the random-init contrastive start copies it)."""
    ns = {}
    with open(os.path.join(ROOT, "config", "laptop_decoder.py")) as f:
        exec(f.read(), ns)
    return ns["model_overrides"]


def write_markdown(r, path):
    seeds = ", ".join(str(s) for s in SEEDS)
    lines = ["# Laptop recipe results" + (" (--fast: toy sizes, not a quality result)" if r["fast"] else ""), "",
             f"STS-B dev (1,500 pairs), cosine similarity, x100. `+ contrastive` rows: the mean of seeds {seeds} "
             "(each run in the last column).", "",
             "| model | pooling | dim | Spearman | Pearson | runs (Spearman) |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for row in r["sts_dev"]:
        runs = " / ".join(f"{x['spearman']:.2f}" for x in row["runs"]) if len(row["runs"]) > 1 else ""
        lines.append(f"| {row['model']} | {row['pooling']} | {row['dim'] or ''} | {row['spearman']:.2f} | "
                     f"{row['pearson']:.2f} | {runs} |")
    t = r["sts_test_final"]
    lines += ["", f"STS-B test (1,379 pairs), once, the final model ({t['model']}): Spearman {t['spearman']:.2f}, "
              f"Pearson {t['pearson']:.2f}. (all-MiniLM-L6-v2, published: 82.03.)", "",
              "Training (CPU; decoder and UL2 losses are cross-entropy over the trimmed vocabulary, contrastive "
              "losses InfoNCE summed over the Matryoshka widths):", "",
              "| stage | iters | first loss | last loss | val loss (start → end) | tokens/s (median) | wall |",
              "| --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for name, s in r["stages"].items():
        val = f"{s['val_first']:.3f} → {s['val_last']:.3f}" if s["val_last"] is not None else "n/a"
        lines.append(f"| {name} | {s['iters']} | {s['first_loss']:.3f} | {s['last_loss']:.3f} | {val} | "
                     f"{s['tok_per_s']:,.0f} | {s['wall_s'] / 60:.1f} min |")
    lines += ["", f"Corpus: the first {r['train_mb']} MB of enwiki_train.txt; tokens {r['tokens']}. Export check: "
              f"transformers vs ours max |logit diff| {r['export_max_abs_diff']:.1e}. Training stages "
              f"{r['stage_wall_s'] / 60:.1f} min (as first run); this invocation {r['total_wall_s'] / 60:.1f} min.",
              "", "Span infilling by the UL2 model (greedy):", ""]
    lines += [f"    {s}" for s in r["samples"]]
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
