"""Masked-diffusion demo on a laptop: a small Qwen3 decoder -> masked-diffusion LM on Wikipedia -> SFT on
SQuAD conversations -> samples, and plain vs threshold+cache sampling speed.

    python scripts/diffusion_demo.py                  # writes under out/diffusion_demo/
    python scripts/diffusion_demo.py --decoder DIR    # start from an existing Qwen3 dir (e.g. the laptop recipe's)

Stages (each a normal command of this project, printed as it runs; a rerun skips finished stages):
  1. the first --mb MB of ../shared/data/corpus/enwiki_train.txt (one document per paragraph) as shards
  2. unless --decoder: a causal Qwen3 decoder of the laptop recipe's shape (config/laptop_decoder.py)
  3. objective='diffusion' on the same shards, starting from that decoder's weights (attention made
     bidirectional, nothing added: the mask token is an unused embedding row)
  4. objective='diffusion', diffusion_data='sft' on data/squad_sft (question + passage -> answer)
  5. sample.py --mode diffusion --chat on validation questions; benchmarks/bench_diffusion.py
"""
import argparse
import json
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("QWEN_ENCDEC_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402  (the repo root is on the path only now)


def run(cmd, log=None):
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if log is None:
        subprocess.run(cmd, check=True, cwd=ROOT)
        return
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in p.stdout:
            print(line, end="", flush=True)
            f.write(line)
        if p.wait():
            sys.exit(f"diffusion_demo.py: {cmd[0]} failed; see {log}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "out", "diffusion_demo"))
    p.add_argument("--decoder", default=None, help="a Qwen3 dir to start from (skips stage 2)")
    p.add_argument("--mb", type=float, default=4.0, help="MB of Wikipedia text")
    p.add_argument("--decoder_iters", type=int, default=150)
    p.add_argument("--diffusion_iters", type=int, default=300)
    p.add_argument("--sft_iters", type=int, default=200)
    p.add_argument("--threads", default="2")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", args.threads)
    py = sys.executable
    os.makedirs(args.out, exist_ok=True)

    # 1. shards
    data = os.path.join(args.out, "enwiki")
    if not os.path.isfile(os.path.join(data, "meta.json")):
        jsonl = os.path.join(args.out, "enwiki.jsonl")
        with open(os.path.join(SHARED, "corpus", "enwiki_train.txt"), encoding="utf-8") as f:
            text = f.read(int(args.mb * 1e6))
        with open(jsonl, "w", encoding="utf-8") as g:
            for line in text[:text.rfind("\n")].splitlines():
                if line.strip():
                    g.write(json.dumps({"text": line.strip()}) + "\n")
        run([py, "data/slimpajama_6b_qwen3/prepare.py", "--input", jsonl, "--out", data, "--val_every", "50"])

    # 2. a causal decoder (the laptop recipe's stand-in for Qwen3-0.6B)
    decoder = args.decoder
    if decoder is None:
        out = os.path.join(args.out, "decoder")
        if checkpoint.newest(out) is None:
            run([py, "train.py", "config/laptop_decoder.py", f"--data_dir={data}", f"--out_dir={out}",
                 f"--max_iters={args.decoder_iters}", f"--eval_interval={args.decoder_iters}", "--log_interval=10",
                 "--eval_iters=4", "--warmup_iters=10"], os.path.join(args.out, "decoder.log"))
        decoder = checkpoint.newest(out)

    # 3. masked diffusion on Wikipedia from the decoder's weights
    mdm = os.path.join(args.out, "mdm")
    if checkpoint.newest(mdm) is None:
        run([py, "train.py", "--objective=diffusion", "--init_from=qwen3", f"--qwen3_path={decoder}",
             f"--data_dir={data}", f"--out_dir={mdm}", "--trim_vocab=True", "--dec_len=128", "--batch_size=16",
             f"--max_iters={args.diffusion_iters}", f"--eval_interval={args.diffusion_iters}", "--eval_iters=4",
             "--log_interval=10", "--warmup_iters=10", "--learning_rate=1e-3", "--min_lr=1e-4", "--ckpt_interval=0",
             "--keep_last=1", "--device=cpu"], os.path.join(args.out, "mdm.log"))

    # 4. SFT on SQuAD conversations
    sft_data = os.path.join(ROOT, "data", "squad_sft")
    if not os.path.isfile(os.path.join(sft_data, "val.jsonl")):
        run([py, "data/squad_sft/prepare.py"])
    sft = os.path.join(args.out, "sft")
    if checkpoint.newest(sft) is None:
        run([py, "train.py", "--objective=diffusion", "--diffusion_data=sft", "--init_from=qwen3",
             f"--qwen3_path={checkpoint.newest(mdm)}", f"--data_dir={data}", f"--out_dir={sft}", "--trim_vocab=True",
             f"--diffusion_sft_train={sft_data}/train.jsonl", f"--diffusion_sft_val={sft_data}/val.jsonl",
             "--diffusion_seq_len=192", "--batch_size=8", f"--max_iters={args.sft_iters}",
             f"--eval_interval={args.sft_iters}", "--eval_iters=4", "--log_interval=10", "--warmup_iters=10",
             "--learning_rate=5e-4", "--min_lr=5e-5", "--ckpt_interval=0", "--keep_last=1", "--device=cpu"],
            os.path.join(args.out, "sft.log"))

    # 5. samples and speed
    questions = os.path.join(args.out, "questions.txt")
    with open(os.path.join(sft_data, "val.jsonl"), encoding="utf-8") as f:
        recs = [json.loads(next(f)) for _ in range(4)]
    with open(questions, "w", encoding="utf-8") as g:
        for r in recs:
            g.write(r["conversations"][0]["value"].replace("\n", " ") + "\n")
    run([py, "sample.py", "--ckpt", checkpoint.newest(sft), "--mode", "diffusion", "--chat", "--prompt_file", questions,
         "--max_new_tokens", "16", "--block_length", "16", "--steps", "16", "--show_target"],
        os.path.join(args.out, "samples.txt"))
    run([py, "benchmarks/bench_diffusion.py", "--ckpt", checkpoint.newest(sft), "--sft", f"{sft_data}/val.jsonl",
         "--num_prompts", "8", "--batch_size", "8", "--gen_length", "32", "--block_length", "16",
         "--threshold", "0.9", "--repeats", "1", "--json", os.path.join(args.out, "bench.json")],
        os.path.join(args.out, "bench.txt"))
    run([py, "sample.py", "--ckpt", checkpoint.newest(mdm), "--mode", "diffusion", "--prompt",
         "The history of the city begins", "--max_new_tokens", "32", "--block_length", "16", "--steps", "32"],
        os.path.join(args.out, "samples_pretrained.txt"))


if __name__ == "__main__":
    main()
