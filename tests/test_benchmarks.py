"""benchmarks/bench_step.py and benchmarks/gpu_check.py: the parts that decide what they report (which examples
each model sees, which attention kernel ran, what a CPU-only machine is told), and model_config.py's command line."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_step  # noqa: E402
import gpu_check  # noqa: E402
from tokenizer import EOS_ID, IGNORE_INDEX  # noqa: E402


def test_padded_batch_holds_exactly_the_packed_examples():
    """transformers' batch must be the same examples as ours: every segment of every packed row, token for token,
    one per row, right-padded, masks and -100 labels exactly on the padding."""
    batch = bench_step.ul2_batches(48, 48, rows=3, count=1, seed=3)[0]
    assert int(batch["enc_seg"].max()) >= 2  # packed: several examples in a row
    examples = bench_step.segments(batch)
    hf = bench_step.padded_batch(examples, EOS_ID)
    assert len(examples) == int(sum(int(s.max()) for s in batch["enc_seg"]))
    assert bench_step.real_tokens(batch) == int(hf["attention_mask"].sum() + hf["decoder_attention_mask"].sum())
    i = 0
    for r in range(3):
        for k in range(1, int(batch["enc_seg"][r].max()) + 1):
            enc = batch["enc_ids"][r][batch["enc_seg"][r] == k]
            lab = batch["labels"][r][batch["dec_seg"][r] == k]
            n, m = int(hf["attention_mask"][i].sum()), int(hf["decoder_attention_mask"][i].sum())
            assert torch.equal(hf["input_ids"][i, :n], enc) and (hf["input_ids"][i, n:] == EOS_ID).all()
            assert torch.equal(hf["labels"][i, :m], lab) and (hf["labels"][i, m:] == IGNORE_INDEX).all()
            assert hf["attention_mask"][i, :n].all() and hf["decoder_attention_mask"][i, :m].all()
            i += 1
    assert i == len(examples)


def test_attention_kinds_from_profiler_names():
    """Event names as torch.profiler reports them (aten ops on CPU, kernel names on CUDA)."""
    kinds = gpu_check.attention_kinds
    assert set(kinds({"aten::_scaled_dot_product_flash_attention", "void pytorch_flash::flash_fwd_kernel<...>"})) \
        == {"flash"}
    assert set(kinds({"aten::_scaled_dot_product_efficient_attention", "fmha_cutlassF_bf16_aligned_64x64_rf_sm80"})) \
        == {"efficient"}
    assert set(kinds({"triton_tem_fused_flex_attention_0", "aten::mm"})) == {"flex"}
    assert set(kinds({"aten::_scaled_dot_product_attention_math", "aten::_softmax", "aten::bmm"})) == {"math"}
    assert set(kinds({"triton_per_fused__softmax_3"})) == {"math"}  # the math fallback, decomposed under compile
    # a loss's log-softmax is not attention
    assert kinds({"aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::mm"}) == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the check would run")
def test_gpu_check_without_cuda_says_so_in_one_line():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py")], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == gpu_check.SKIPPED == 77
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]


def test_model_config_cli_unknown_preset_is_one_line():
    out = subprocess.run([sys.executable, "model_config.py", "nope"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "'nope'" in out.stderr
    ok = subprocess.run([sys.executable, "model_config.py", "tiny"], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0 and ok.stdout.startswith("tiny ")


def test_ul2_batches_are_packed_and_mostly_real():
    """bench_step trains ours on train.py's packed rows: real-token fraction well above unpacked UL2's ~0.52."""
    batches = bench_step.ul2_batches(64, 64, rows=4, count=2)
    frac = sum(bench_step.real_tokens(b) for b in batches) / sum(bench_step.positions(b) for b in batches)
    assert frac >= 0.9
    for b in batches:
        pad = b["dec_seg"] == 0
        assert (b["labels"][pad] == IGNORE_INDEX).all() and np.all(b["labels"][~pad].numpy() != IGNORE_INDEX)
