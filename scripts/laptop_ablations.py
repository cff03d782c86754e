"""Ablations on the laptop recipe's models (issue 13 item 4), after scripts/laptop_recipe.py has run:

  (a) enc_rope: encoder keys in the decoder's merged attention unrotated ('none': a key at position 0, so the
      decoder query at position m sees every encoder key at distance m) or rotated at their own positions with
      the decoder's positions continuing after the encoder's ('prefix'). Two UL2 runs from the same decoder
      (the recipe's UL2 run is one arm): validation loss per denoiser right after conversion (iter 0) and after
      UL2, and STS-B dev of each encoder, raw (mean pooling) and after the same contrastive stage (three seeds).
  (b) a UL2 mode token before every text at embedding time, or not. eval_embed tokenizes with special tokens
      allowed, so the prompt text "<|ul2_S|>" becomes id 151671. Raw UL2 encoder with <|ul2_R|> / <|ul2_S|> /
      none; then the contrastive stage with and without <|ul2_S|> (contrastive_mode_token: the recipe's runs
      are one arm, none by default; the other arm sets it), each exported with its token as the default
      prompt, so STS is scored as trained (S: clean text in the encoder, as the prefix-LM
      denoiser gives it, where R/X inputs hold sentinels); three seeds.
  (c) mean / last / cls pooling, each trained by the contrastive stage with that pooling (two seeds).
(a) and (c) run the contrastive stage with the recipe's mode token.

Every contrastive arm reports its SNLI dev loss (the stage's own validation loss) beside STS-B dev, so a
default is not chosen on STS-B alone.

    python scripts/laptop_ablations.py                      # after python scripts/laptop_recipe.py
    python scripts/laptop_ablations.py --fast --recipe out/laptop-fast   # after laptop_recipe.py --fast

Training runs are ordinary train.py / extract.py / eval_embed.py commands, printed before they run and
skipped when their output exists. The raw encoder's mode-token scores (b) are computed in this process, the
prompt passed to Encoder.encode (a raw encoder has no default prompt). Writes ablations.md and ablations.json.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import laptop_recipe as R  # noqa: E402  (also puts the repo root on the path)

MODE_PROMPTS = {"none": "", "<|ul2_R|>": "<|ul2_R|>", "<|ul2_S|>": "<|ul2_S|>"}
# (a) and (b) compare arms that differ by little, so they get a third seed (the recipe ran seeds 1, 2: the
# ablation adds seed 3 of the recipe's own UL2 arm); (c) keeps the recipe's two
AB_SEEDS = (*R.SEEDS, 3)
CONTRASTIVE_MODE = "<|ul2_S|>"  # the mode token (b) trains with


class WithPrompt:
    """An eval_embed model whose every text gets `prompt` in front ('' none); eval_sts asks for no prompt."""

    def __init__(self, model, prompt):
        self.model, self.prompt = model, prompt

    def encode(self, texts, batch_size=None, progress=False, prompt=None):
        return self.model.encode(texts, batch_size=batch_size, progress=progress, prompt=self.prompt)


def sts_with_prompt(enc_dir, prompt, sts):
    import eval_embed
    print(f"# STS-B dev of {enc_dir} with {prompt or 'no'} prompt (eval_embed.Encoder.encode(texts, prompt=...))",
          flush=True)
    return eval_embed.eval_sts(WithPrompt(eval_embed.Encoder.from_pretrained(enc_dir), prompt), sts, progress=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="out/laptop", help="the --out of scripts/laptop_recipe.py")
    ap.add_argument("--out", default=None, help="default: RECIPE/ablations")
    ap.add_argument("--shared", default=os.environ.get("QWEN_ENCDEC_SHARED_DATA", os.path.join(R.ROOT, "..", "shared", "data")))
    ap.add_argument("--fast", action="store_true", help="toy sizes (use with a recipe run made with --fast)")
    args = ap.parse_args()
    rec = os.path.abspath(args.recipe)
    out = os.path.abspath(args.out or os.path.join(rec, "ablations"))
    shared = os.path.abspath(args.shared)
    needed = [os.path.join(rec, n) for n in ("report.json", "data", "qwen3_decoder", "ul2", "encoders/ul2")]
    for n in needed:
        if not os.path.exists(n):
            sys.exit(f"laptop_ablations: {n} not found; run python scripts/laptop_recipe.py "
                     f"{'--fast ' if args.fast else ''}--out {args.recipe} first")
    with open(os.path.join(rec, "report.json")) as f:
        if json.load(f)["fast"] != args.fast:
            sys.exit(f"laptop_ablations: {rec} was made {'without' if args.fast else 'with'} --fast; pass the same")
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    p = lambda *n: os.path.join(out, *n)  # noqa: E731
    dev = os.path.join(shared, "sts", "stsb_dev.tsv")
    results = p("sts_results.json")
    nli = [f"--contrastive_data={shared}/nli/snli_train_subset.tsv", f"--contrastive_val_data={shared}/nli/snli_dev.tsv"]
    fast_con = R.FAST_CONTRASTIVE if args.fast else []
    done, report = {}, {"fast": args.fast}

    snli = {}  # encoder dir -> SNLI dev loss at the end of its contrastive run

    def contrastive(name, start, extra, seed):
        """One contrastive run (the recipe's stage and seed) + its extracted encoder; reuses the recipe's own."""
        if name == "ul2" and seed in R.SEEDS:  # the recipe's own run
            enc = os.path.join(rec, "encoders", f"ul2-s{seed}")
            snli[enc] = R.train_summary(os.path.join(rec, "contrastive", f"ul2-s{seed}"), None)["val_last"]
            return enc
        run_dir = p("contrastive", f"{name}-s{seed}")
        R.train_stage(py, "config/laptop_contrastive.py", run_dir,
                      [*start, f"--seed={seed}", *nli, *fast_con, *extra], p("contrastive", f"{name}-s{seed}.log"), done)
        enc = p("encoders", f"{name}-s{seed}")
        if not os.path.isdir(enc):
            R.run([py, "extract.py", "--ckpt", run_dir, "--out", enc])
        snli[enc] = R.train_summary(run_dir, None)["val_last"]
        return enc

    # (a) enc_rope: the recipe's UL2 run is the arm its config names; train the other from the same decoder
    with open(os.path.join(R.checkpoint.newest(os.path.join(rec, "ul2")), "config.json")) as f:
        base_rope = json.load(f).get("enc_rope", "none")
    other = "prefix" if base_rope == "none" else "none"
    ul2 = {base_rope: os.path.join(rec, "ul2"), other: p(f"ul2-{other}")}
    R.train_stage(py, "config/laptop_ul2.py", ul2[other],
                  [f"--data_dir={rec}/data", f"--qwen3_path={rec}/qwen3_decoder", f"--model_overrides={{'enc_rope': '{other}'}}",
                   *(R.FAST_UL2 if args.fast else [])], p(f"ul2-{other}.log"), done)
    raw_enc = {base_rope: os.path.join(rec, "encoders", "ul2"), other: p("encoders", f"ul2-{other}")}
    if not os.path.isdir(raw_enc[other]):
        R.run([py, "extract.py", "--ckpt", ul2[other], "--out", raw_enc[other], "--pooling", "mean"])
    ul2_start = ["--init_from=pretrained", f"--init_path={ul2[base_rope]}"]
    con_enc = {base_rope: [contrastive("ul2", ul2_start, [], s) for s in AB_SEEDS],
               other: [contrastive(f"ul2-{other}", ["--init_from=pretrained", f"--init_path={ul2[other]}"], [], s)
                       for s in AB_SEEDS]}
    specs = [f"ours:{e}" for e in raw_enc.values()] + [f"ours:{e}" for es in con_enc.values() for e in es]
    scores = R.evaluate(py, specs, dev, results)
    report["enc_rope"] = {}
    for rope in (base_rope, other):
        s = R.train_summary(ul2[rope], None)
        report["enc_rope"][rope] = {
            "val_iter0": s["val_groups_first"], "val_end": s["val_groups_last"], "val_loss_iter0": s["val_first"],
            "val_loss_end": s["val_last"], "raw": scores[f"ours:{raw_enc[rope]}"],
            "contrastive": [scores[f"ours:{e}"] for e in con_enc[rope]],
            "snli_dev": [snli[e] for e in con_enc[rope]]}

    # (b) a mode token before every text at embedding time
    report["mode_token"] = {"raw": {}, "contrastive": {}}
    base_raw = raw_enc[base_rope]
    for name, prompt in MODE_PROMPTS.items():
        report["mode_token"]["raw"][name] = sts_with_prompt(base_raw, prompt, dev)
    # the recipe's runs are one arm (the mode token they were trained and exported with, their default prompt);
    # train the other with it set explicitly
    import eval_embed
    recipe_ckpt = R.checkpoint.newest(os.path.join(rec, "contrastive", f"ul2-s{R.SEEDS[0]}"))
    recipe_run = eval_embed.contrastive_run_config(recipe_ckpt)
    base_mode = eval_embed.run_prompts(recipe_run).get("default", "")
    other_mode = "" if base_mode else CONTRASTIVE_MODE
    mode_enc = {base_mode: con_enc[base_rope],
                other_mode: [contrastive(f"ul2-{other_mode.strip('<|>') or 'notoken'}", ul2_start,
                                         [f"--contrastive_mode_token={other_mode}"], s) for s in AB_SEEDS]}
    scores = R.evaluate(py, [f"ours:{e}" for e in mode_enc[other_mode]], dev, results)
    arms = {m or "none": mode_enc[m] for m in ("", CONTRASTIVE_MODE)}
    report["mode_token"]["recipe"] = base_mode or "none"
    report["mode_token"]["contrastive"] = {k: [scores[f"ours:{e}"] for e in es] for k, es in arms.items()}
    report["mode_token"]["snli_dev"] = {k: [snli[e] for e in es] for k, es in arms.items()}

    # (c) pooling, each trained with the pooling it is scored with
    pool_enc = {"mean": con_enc[base_rope][:len(R.SEEDS)]}
    for how in ("last", "cls"):
        pool_enc[how] = [contrastive(f"ul2-{how}", ul2_start, [f"--contrastive_pooling={how}"], s) for s in R.SEEDS]
    scores = R.evaluate(py, [f"ours:{e}" for es in pool_enc.values() for e in es], dev, results)
    report["pooling"] = {how: [scores[f"ours:{e}"] for e in es] for how, es in pool_enc.items()}
    report["pooling_snli_dev"] = {how: [snli[e] for e in es] for how, es in pool_enc.items()}
    report["base_enc_rope"] = base_rope
    report["stages"] = done

    with open(p("ablations.json.tmp"), "w") as f:
        json.dump(report, f, indent=1)
    os.replace(p("ablations.json.tmp"), p("ablations.json"))
    write_markdown(report, p("ablations.md"))
    print(open(p("ablations.md")).read())


def spread(xs, digits=2):
    """'mean (run / run)' of numbers over seeds."""
    return f"{R.mean(xs):.{digits}f} ({' / '.join(f'{x:.{digits}f}' for x in xs)})"


def two(runs, key="spearman"):
    """spread of an STS metric over seeds."""
    return spread([r[key] for r in runs])


def losses(xs):
    """spread of SNLI dev losses."""
    return spread(xs, 3)


def write_markdown(r, path):
    seeds = ", ".join(str(s) for s in R.SEEDS)
    ab_seeds = ", ".join(str(s) for s in AB_SEEDS)
    L = ["# Laptop ablations" + (" (--fast: toy sizes, not a quality result)" if r["fast"] else ""), "",
         f"STS-B dev Spearman x100; after the contrastive stage: the mean of seeds {ab_seeds} in (a) and (b), "
         f"{seeds} in (c) (each run in brackets), and the stage's SNLI dev loss (InfoNCE summed over the "
         "Matryoshka widths; lower is better).", "",
         "## (a) encoder keys in merged attention: enc_rope", "",
         "Validation loss per denoiser (trimmed-vocabulary cross-entropy) right after conversion (iter 0) and "
         "after UL2:", ""]
    ropes = list(r["enc_rope"])
    groups = list(r["enc_rope"][ropes[0]]["val_iter0"])
    L += ["| enc_rope | when | " + " | ".join(groups) + " | all |", "| --- | --- |" + " ---: |" * (len(groups) + 1)]
    for rope in ropes:
        a = r["enc_rope"][rope]
        for when, key, tot in (("iter 0", "val_iter0", "val_loss_iter0"), ("end", "val_end", "val_loss_end")):
            L.append(f"| {rope} | {when} | " + " | ".join(f"{a[key][g]:.4f}" for g in groups) + f" | {a[tot]:.4f} |")
    L += ["", "| enc_rope | raw encoder (mean) | + contrastive | SNLI dev loss |", "| --- | ---: | ---: | ---: |"]
    for rope in ropes:
        a = r["enc_rope"][rope]
        L.append(f"| {rope} | {a['raw']['spearman']:.2f} | {two(a['contrastive'])} | {losses(a['snli_dev'])} |")
    mode = r["mode_token"].get("recipe", "none")
    L += ["", f"(a) and (c) train the contrastive stage with the recipe's mode token ({mode}).", "",
          "## (b) a mode token before every text at embedding time", "",
          "| model | prompt | Spearman | SNLI dev loss |", "| --- | --- | ---: | ---: |"]
    for name, s in r["mode_token"]["raw"].items():
        L.append(f"| UL2 encoder (mean) | {name} | {s['spearman']:.2f} | |")
    for name, runs in r["mode_token"]["contrastive"].items():
        L.append(f"| UL2 encoder + contrastive (trained with it, its default prompt) | {name} | {two(runs)} | "
                 f"{losses(r['mode_token']['snli_dev'][name])} |")
    L += ["", "## (c) pooling after the contrastive stage (trained with the same pooling)", "",
          "| pooling | Spearman | Pearson | SNLI dev loss |", "| --- | ---: | ---: | ---: |"]
    for how, runs in r["pooling"].items():
        L.append(f"| {how} | {two(runs)} | {two(runs, 'pearson')} | {losses(r['pooling_snli_dev'][how])} |")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(L) + "\n")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
