"""scripts/laptop_recipe.py --fast: every stage's output loads in the next, losses fall, the table is written.
Toy sizes: this checks the pipeline's contracts, not the quality of the embedding."""
import json
import math
import os
import subprocess
import sys

from conftest import ROOT


def test_fast_recipe_end_to_end(tmp_path, shared_data):
    out = tmp_path / "laptop"
    proc = subprocess.run([sys.executable, "scripts/laptop_recipe.py", "--fast", "--out", str(out),
                           "--shared", shared_data], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    # 1. the causal decoder trained; 2. its Hugging Face export gives transformers' logits
    assert report["decoder"]["last_loss"] < report["decoder"]["first_loss"]
    assert report["export_max_abs_diff"] <= 1e-4
    assert json.loads((out / "qwen3_decoder" / "config.json").read_text())["model_type"] == "qwen3"
    # 3. UL2 from it: the encoder-decoder's validation loss fell
    assert report["ul2"]["val_last"] < report["ul2"]["val_first"]
    # 4. infilling printed one line per prompt
    assert len(report["samples"]) == 4
    # 5. the extracted encoder and the baselines were all scored on STS-B dev
    assert len(report["sts"]) == 4
    for metrics in report["sts"].values():
        assert metrics["pairs"] == 1500 and math.isfinite(metrics["spearman"])
    from eval_embed import Encoder
    emb = Encoder.from_pretrained(str(out / "encoder")).encode(["A man is playing a guitar."])
    assert emb.shape[0] == 1
    # 6. the table names every model and both training stages
    table = (out / "results.md").read_text()
    for name in report["sts"]:
        assert name in table
    assert "1. causal decoder" in table and "3. UL2 encoder-decoder" in table
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
