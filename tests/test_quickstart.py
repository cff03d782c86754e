"""The README's quick start learns visibly: `python train.py config/tiny_shakespeare.py`, run as it is, lowers the
loss by >= 30 % from its first logged value, and sample.py on its checkpoint fills spans with words.
Slow (~1 minute on 2 idle cores): at 300 iterations the greedy spans were still ':', newlines and at most an 'I'.
"""
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_quick_start_loss_falls_and_spans_get_words(tmp_path, shared_data):
    data, out = tmp_path / "data", tmp_path / "out"
    py = sys.executable
    subprocess.run([py, "data/shakespeare_qwen3/prepare.py", f"{shared_data}/corpus/tiny_shakespeare.txt",
                    "--out", str(data)], cwd=ROOT, check=True, capture_output=True)
    proc = subprocess.run([py, "train.py", "config/tiny_shakespeare.py", f"--out_dir={out}", f"--data_dir={data}",
                           "--eval_interval=0"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) >= 5
    assert sum(losses[-3:]) / 3 <= 0.7 * losses[0], losses  # the last three logged (single-step losses are noisy)

    prompts = ["ROMEO: I will <extra_id_0> to the <extra_id_1>.", "First Citizen: We <extra_id_0> the people."]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    proc = subprocess.run([py, "sample.py", "--ckpt", str(out), "--show_target", "--max_new_tokens", "12",
                           "--prompt_file", str(tmp_path / "prompts.txt")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # one block per prompt (separated by a line of dashes); a decoded target may span several lines
    blocks = re.split(r"\n-{40}\n", proc.stdout)
    targets = [b.split("\ntarget: ", 1)[1] for b in blocks if "\ntarget: " in b]
    assert len(targets) == len(prompts), proc.stdout
    for prompt, target in zip(prompts, targets):
        # the decoder opens with the first sentinel and its span holds a word (letters, not only punctuation)
        spans = re.split(r"<extra_id_\d+>", target.split("<|endoftext|>")[0])[1:]
        assert target.startswith("<extra_id_0>") and spans, target
        assert re.search(r"[A-Za-z]", "".join(spans)), target
