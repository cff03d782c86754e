"""scripts/laptop_recipe.py --fast: every stage's output loads in the next, losses fall, the table has the issue's
rows, and a rerun skips every finished stage. Toy sizes: this checks the pipeline's contracts, not the quality
of the embedding."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

ROWS = [("random encoder", "mean"), ("causal decoder", "mean"), ("causal decoder", "last"), ("UL2 encoder", "mean"),
        ("all-MiniLM-L6-v2", "mean"), ("random init + contrastive", "mean"), ("causal decoder + contrastive", "mean"),
        ("UL2 encoder + contrastive", "mean")]


def recipe(out, shared):
    proc = subprocess.run([sys.executable, "scripts/laptop_recipe.py", "--fast", "--out", str(out), "--shared", shared],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_fast_recipe_end_to_end(tmp_path, shared_data):
    out = tmp_path / "laptop"
    recipe(out, shared_data)
    report = json.loads((out / "report.json").read_text())
    st = report["stages"]
    # 0. Wikipedia shards: the val split is enwiki_valid.txt's articles
    assert report["tokens"]["train"] > 100_000 and report["tokens"]["val"] > 1_000
    # 1. the causal decoder trained; 2. its Hugging Face export gives transformers' logits
    assert st["decoder"]["val_last"] < st["decoder"]["val_first"]
    assert report["export_max_abs_diff"] <= 1e-4
    assert json.loads((out / "qwen3_decoder" / "config.json").read_text())["model_type"] == "qwen3"
    # 3. UL2 from it: the encoder-decoder's validation loss fell
    assert st["ul2"]["val_last"] < st["ul2"]["val_first"]
    # 4. infilling printed one line per prompt
    assert len(report["samples"]) == 4
    # 5. six contrastive runs (3 starts x 2 seeds); the SNLI dev loss fell on average
    con = [s for name, s in st.items() if name.startswith("contrastive")]
    assert len(con) == 6 and all(s["iters"] == con[0]["iters"] for s in con)
    assert np.mean([s["val_last"] for s in con]) < np.mean([s["val_first"] for s in con])
    # 6-7. the rows the issue names, each scored on all 1,500 STS-B dev pairs; + contrastive rows over two seeds
    rows = report["sts_dev"]
    assert [(r["model"], r["pooling"]) for r in rows if r["dim"] in (None, 64)] == ROWS
    dims = [r["dim"] for r in rows if r["model"] == "UL2 encoder + contrastive"]
    assert dims == [64, 32, 16]  # full width, then each Matryoshka prefix below it
    for r in rows:
        assert all(x["pairs"] == 1500 for x in r["runs"]) and math.isfinite(r["spearman"])
        assert len(r["runs"]) == (2 if "contrastive" in r["model"] else 1)
        assert abs(r["spearman"] - np.mean([x["spearman"] for x in r["runs"]])) < 1e-9
    minilm = next(r for r in rows if r["model"] == "all-MiniLM-L6-v2")
    assert minilm["spearman"] > 80  # the reference is really all-MiniLM-L6-v2 (87.0 on dev)
    assert report["sts_test_final"]["pairs"] == 1379
    # the final model loads as an embedding model, also at a Matryoshka width
    from eval_embed import Encoder
    e = Encoder.from_pretrained(report["final_encoder"], truncate_dim=16).encode(["A man is playing a guitar."])
    assert e.shape == (1, 16) and abs(np.linalg.norm(e) - 1) < 1e-5
    # the table names every row and every stage
    table = (out / "results.md").read_text()
    for name, _ in ROWS:
        assert f"| {name} |" in table
    for name in st:
        assert f"| {name} |" in table
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]

    # a rerun trains, extracts and evaluates nothing again
    log = recipe(out, shared_data)
    for stage in ("prepare.py", "train.py", "extract.py", "eval_embed.py"):
        assert f" {stage} " not in log, stage
    assert json.loads((out / "report.json").read_text())["sts_dev"] == rows


@pytest.mark.slow
def test_fast_ablations_report_every_arm(tmp_path, shared_data):
    """scripts/laptop_ablations.py --fast after a --fast recipe: every arm of (a), (b), (c) is trained, scored on
    STS-B dev and carries its SNLI dev loss; (a) and (b) over three seeds, reusing the recipe's seeds 1, 2."""
    out = tmp_path / "laptop"
    recipe(out, shared_data)
    proc = subprocess.run([sys.executable, "scripts/laptop_ablations.py", "--fast", "--recipe", str(out),
                           "--shared", shared_data], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "ablations" / "ablations.json").read_text())
    recipe_ul2 = json.loads((out / "report.json").read_text())["stages"]["contrastive ul2 seed 1"]["val_last"]
    assert set(r["enc_rope"]) == {"none", "prefix"}
    for arm in r["enc_rope"].values():
        assert len(arm["contrastive"]) == len(arm["snli_dev"]) == 3
        assert arm["val_loss_end"] < arm["val_loss_iter0"]  # each UL2 arm trained
        assert all(x["pairs"] == 1500 and math.isfinite(x["spearman"]) for x in [arm["raw"], *arm["contrastive"]])
    assert r["enc_rope"][r["base_enc_rope"]]["snli_dev"][0] == recipe_ul2  # seed 1 is the recipe's own run
    assert set(r["mode_token"]["raw"]) == {"none", "<|ul2_R|>", "<|ul2_S|>"}
    assert all(len(v) == 3 for v in [*r["mode_token"]["contrastive"].values(), *r["mode_token"]["snli_dev"].values()])
    assert set(r["pooling"]) == {"mean", "last", "cls"} and all(len(v) == 2 for v in r["pooling"].values())
    table = (out / "ablations" / "ablations.md").read_text()
    assert "SNLI dev loss" in table and "| prefix |" in table and "| cls |" in table
