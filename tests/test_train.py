"""train.py: loss falls, init from Qwen3, exact resume, multi-process equivalence and checkpoint
interchange, one-line errors on bad input, and checkpoints that survive kill -9.

Most runs call train.main() in-process on tiny synthetic shards written with shards.py; the
command line, torchrun and kill -9 tests start real processes."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
import shards
import train
from conftest import ROOT
from model import EncoderDecoder
from tokenizer import EOS_ID, VOCAB_SIZE

# a tiny model and short windows: one iteration is a few hundred ms on 2 cores (the 152K-row head dominates)
TINY = ["--model_preset=tiny_encdec", "--batch_size=2", "--enc_len=48", "--dec_len=32", "--eval_interval=0",
        "--log_interval=1", "--warmup_iters=1", "--learning_rate=3e-3", "--device=cpu", "--seed=7"]


class IntTokenizer:
    """Stands in for tokenizer.py when writing synthetic shards: documents are space-separated ids."""
    vocab_size, eos_id, fingerprint = VOCAB_SIZE, EOS_ID, "synthetic-ints"

    def __init__(self, vocab_size=VOCAB_SIZE):
        self.vocab_size = vocab_size

    def encode_batch(self, docs, allow_special=False):
        return [[int(t) for t in d.split()] for d in docs]

    def encode_documents(self, docs):
        return np.array([i for ids in self.encode_batch(docs) for i in ids + [EOS_ID]], dtype=np.uint32)


def write_synthetic(out_dir, vocab_size=VOCAB_SIZE, docs=60, seed=0):
    """Documents of a repeated random phrase over 300 ids: learnable, and spread over several shards."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(docs):
        phrase = rng.integers(0, 300, size=rng.integers(5, 20))
        texts.append(" ".join(map(str, np.tile(phrase, 200 // len(phrase) + 1)[:200])))
    splits = {"train": lambda start: iter(texts[start:docs - 10]), "val": lambda start: iter(texts[docs - 10 + start:])}
    shards.prepare(out_dir, splits, IntTokenizer(vocab_size), tokens_per_shard=4000, source={"synthetic": seed})
    return out_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic(str(tmp_path_factory.mktemp("synthetic")))


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out_dir):
    return {r["iter"]: r["loss"] for r in read_log(out_dir) if "loss" in r}


def run(*argv):
    return train.main([str(a) for a in argv])


def weights(ckpt):
    return load_file(os.path.join(ckpt, "model.safetensors"))


def assert_same_tensors(a, b, atol=0.0):
    """Bitwise, or close: summation order differs between process counts, and Adam's m / sqrt(v)
    magnifies that in the few elements whose gradients are ~0, so compare max and mean."""
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            diff = (a[k] - b[k]).abs()
            assert diff.max() <= atol and diff.mean() <= atol / 100, (k, diff.max().item(), diff.mean().item())


# ---------------------------------------------------------------------------------------
# 1. the tiny config learns

def test_tiny_shakespeare_loss_falls(tmp_path, shared_data):
    """config/tiny_shakespeare.py on the offline corpus: loss >= 30 % below its start within the test's budget."""
    data = tmp_path / "shakespeare"
    subprocess.run([sys.executable, os.path.join(ROOT, "data", "shakespeare_qwen3", "prepare.py"),
                    os.path.join(shared_data, "corpus", "tiny_shakespeare.txt"), "--out", str(data)],
                   check=True, capture_output=True)
    out = tmp_path / "out"
    # the config with a shorter warmup and a higher peak to fit the test's budget of 20 steps, and the full
    # vocabulary (the quick start itself trims it; tests/test_quickstart.py runs it as it is); the same fixed
    # validation batches are scored before the first step and after the last
    run(os.path.join(ROOT, "config", "tiny_shakespeare.py"), f"--data_dir={data}", f"--out_dir={out}",
        "--trim_vocab=False", "--max_iters=20", "--warmup_iters=3", "--learning_rate=6e-3", "--lr_decay_iters=100", "--log_interval=1",
        "--eval_interval=20", "--eval_iters=2")
    val = [r["val_loss"] for r in read_log(out) if "val_loss" in r]
    assert len(val) == 2 and val[0] > 11.0  # ln(152036) = 11.93: a fresh model knows nothing
    assert val[1] < 0.7 * val[0], val
    assert losses(out)[1] > 11.0 and np.mean([losses(out)[i] for i in (18, 19, 20)]) < 0.75 * losses(out)[1]
    assert os.path.isdir(out / "ckpt-0000020")


# ---------------------------------------------------------------------------------------
# 2. init_from='qwen3'

def test_init_from_qwen3_first_loss_equals_direct_computation(tmp_path, data_dir, hf_qwen3_dir):
    from ul2 import UL2
    out = tmp_path / "out"
    run(*TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--init_from=qwen3", f"--qwen3_path={hf_qwen3_dir}",
        "--max_iters=2", "--grad_accum=1")
    # the same first rows (rows 0 and 1, step 0: packed windows of enc_len + dec_len), through a model
    # converted directly
    ul2 = UL2(48, 32, train.DEFAULTS["ul2_mixture"], seed=7)
    windows = data.WindowSampler(shards.ShardDataset(data_dir, "train"), 48 + 32, seed=7, what="").windows(0, 2)
    b = {k: torch.from_numpy(v) for k, v in ul2.make_packed(windows, 0, [0, 1]).items()}
    model = EncoderDecoder.from_qwen3(hf_qwen3_dir)
    with torch.no_grad():
        _, direct = model(b["enc_ids"], None, b["dec_ids"], labels=b["labels"], enc_seg=b["enc_seg"],
                          dec_seg=b["dec_seg"])
    assert losses(out)[1] == pytest.approx(direct.item(), abs=1e-6)
    assert losses(out)[2] < losses(out)[1]  # and it trains
    assert EncoderDecoder.from_pretrained(str(out / "ckpt-0000002")).cfg.vocab_size == VOCAB_SIZE


def test_causal_objective_trains_a_qwen3_that_transformers_loads(tmp_path, data_dir):
    """objective='causal' pretrains a decoder-only Qwen3 (here with a trimmed vocabulary); its checkpoint is a
    Hugging Face directory, and its first loss is next-token cross-entropy over the kept rows."""
    from transformers import Qwen3ForCausalLM

    from model import Qwen3
    from model_config import get_preset
    from vocab_trim import VocabTrim, objective_ids, used_ids
    out = tmp_path / "out"
    run(*TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--objective=causal", "--model_preset=tiny",
        "--trim_vocab=True", "--max_iters=3")
    torch.manual_seed(7)
    model = Qwen3(get_preset("tiny"))
    initial = model.embed.weight.detach().clone()
    import data as data_lib
    data = [shards.ShardDataset(data_dir, s) for s in ("train", "val")]
    trim = VocabTrim(used_ids(data, 151936, objective_ids(False)), 151936)
    trim.shrink(model)
    windows = data_lib.WindowSampler(data[0], 33, seed=7, what="").windows(0, 2)
    idx, labels = trim.to_compact(windows[:, :-1]), trim.to_compact(windows[:, 1:])
    # packed documents: a segment opens at every end-of-text, positions restart there
    seg = 1 + np.cumsum(windows[:, :-1] == EOS_ID, axis=1) - (windows[:, :1] == EOS_ID)
    with torch.no_grad():
        _, direct = model(torch.from_numpy(idx), labels=torch.from_numpy(labels), seg=torch.from_numpy(seg))
    assert losses(out)[1] == pytest.approx(direct.item(), abs=1e-6)
    assert losses(out)[3] < losses(out)[1]
    ckpt = str(out / "ckpt-0000003")
    hf, ours = Qwen3ForCausalLM.from_pretrained(ckpt).eval(), Qwen3.from_pretrained(ckpt).eval()
    ids = torch.as_tensor(trim.kept[:12])[None]
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ours(ids)[0]).abs().max() < 1e-4
    full = ours.embed.weight.detach()
    assert full.shape[0] == 151936  # the checkpoint is full-size again
    dropped = torch.ones(151936, dtype=torch.bool)
    dropped[trim.kept] = False
    assert torch.equal(full[dropped], initial[dropped])  # rows never used are never trained
    assert not torch.equal(full[trim.kept], initial[trim.kept])


def test_trimmed_vocabulary_resumes_exactly(tmp_path, data_dir):
    common = [*TINY, f"--data_dir={data_dir}", "--trim_vocab=True", "--lr_decay_iters=4", "--ckpt_interval=2"]
    run(*common, f"--out_dir={tmp_path / 'straight'}", "--max_iters=4")
    run(*common, f"--out_dir={tmp_path / 'split'}", "--max_iters=2")
    run(*common, f"--out_dir={tmp_path / 'split'}", "--max_iters=4", "--init_from=resume")
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    assert_same_tensors(weights(tmp_path / "straight" / "ckpt-0000004"), weights(tmp_path / "split" / "ckpt-0000004"))
    assert weights(tmp_path / "split" / "ckpt-0000004")["embed.weight"].shape[0] == VOCAB_SIZE


# ---------------------------------------------------------------------------------------
# 3. exact resume

def test_resume_is_bitwise_exact(tmp_path, data_dir):
    common = [*TINY, f"--data_dir={data_dir}", "--grad_accum=2", "--lr_decay_iters=4", "--ckpt_interval=2"]
    run(*common, f"--out_dir={tmp_path / 'straight'}", "--max_iters=4")
    run(*common, f"--out_dir={tmp_path / 'split'}", "--max_iters=2")
    run(*common, f"--out_dir={tmp_path / 'split'}", "--max_iters=4", "--init_from=resume")
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert [straight[i] for i in (1, 2, 3, 4)] == [split[i] for i in (1, 2, 3, 4)]
    for it in ("ckpt-0000002", "ckpt-0000004"):
        assert_same_tensors(weights(tmp_path / "straight" / it), weights(tmp_path / "split" / it))
        a = load_file(tmp_path / "straight" / it / "trainer_state.safetensors")
        b = load_file(tmp_path / "split" / it / "trainer_state.safetensors")
        assert_same_tensors({k: v for k, v in a.items() if k.startswith("optim.")},
                            {k: v for k, v in b.items() if k.startswith("optim.")})
    state = json.loads((tmp_path / "split" / "ckpt-0000004" / "trainer_state.json").read_text())
    assert state["iter"] == 4 and state["examples"] == 4 * 2 * 2


@pytest.mark.parametrize("objective", ["ul2", "causal"])
def test_logged_loss_does_not_depend_on_the_split(tmp_path, data_dir, objective):
    """One global batch of 4 rows as 4 x 1, 2 x 2 and 1 x 4 (batch_size x grad_accum): the same rows, the same
    token-weighted loss (fp32, 1e-6), and so the same update. Processes split it the same way (the slow
    torchrun tests compare 2 processes with 1)."""
    extra = ["--objective=causal", "--model_preset=tiny"] if objective == "causal" else []
    got = {}
    for bs, ga in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"{bs}x{ga}"
        run(*TINY, *extra, f"--data_dir={data_dir}", f"--out_dir={out}", f"--batch_size={bs}", f"--grad_accum={ga}",
            "--max_iters=2")
        got[(bs, ga)] = {r["iter"]: r for r in read_log(out) if "loss" in r}
    # iteration 1: the loss of the same rows and its gradient (through the norm); iteration 2 comes after an
    # Adam step, whose first update is lr * g / |g| per element: rounding in near-zero gradients (summation
    # order) flips a few of them, so it is compared at 1e-5
    ref = got[(4, 1)]
    for split, log in got.items():
        assert abs(log[1]["loss"] - ref[1]["loss"]) <= 1e-6, (split, log[1]["loss"], ref[1]["loss"])
        assert abs(log[1]["grad_norm"] - ref[1]["grad_norm"]) <= 1e-6 * ref[1]["grad_norm"], split
        assert abs(log[2]["loss"] - ref[2]["loss"]) <= 1e-5, (split, log[2]["loss"], ref[2]["loss"])


def test_activation_checkpointing_changes_nothing(tmp_path, data_dir):
    common = [*TINY, f"--data_dir={data_dir}", "--max_iters=2"]
    run(*common, f"--out_dir={tmp_path / 'a'}")
    run(*common, f"--out_dir={tmp_path / 'b'}", "--activation_checkpointing=True")
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


# ---------------------------------------------------------------------------------------
# data: disjoint windows

def test_windows_of_an_epoch_never_overlap(data_dir):
    ds = shards.ShardDataset(data_dir, "train")
    assert len(ds.shards) > 1
    length = 37
    sampler = data.WindowSampler(ds, length, seed=3, what="")
    spans = []
    for k in range(sampler.num_slots):  # one epoch, drawn one example at a time as processes would
        sampler.windows(k, 1)
        slot = int(sampler.order[k])
        shard = int(np.searchsorted(sampler.first_slot, slot, side="right")) - 1
        start = sampler.phase + (slot - int(sampler.first_slot[shard])) * length
        spans.append((shard, start))
        assert np.array_equal(sampler.windows(k, 1)[0], np.asarray(ds.shards[shard][start:start + length]))
    assert len(set(spans)) == len(spans)
    for shard in set(s for s, _ in spans):
        starts = sorted(st for s, st in spans if s == shard)
        assert all(b - a >= length for a, b in zip(starts, starts[1:]))
    # the next epoch is another order at another phase
    nxt = [tuple(sampler.windows(sampler.num_slots + k, 1)[0][:5]) for k in range(5)]
    assert nxt != [tuple(sampler.windows(k, 1)[0][:5]) for k in range(5)]


# ---------------------------------------------------------------------------------------
# 5. bad input stops the run before training, with one line

def _error(argv):
    with pytest.raises(train.Fail) as e:
        run(*argv)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_bad_input_one_line_errors_before_training(tmp_path, data_dir):
    out = tmp_path / "out"
    base = [*TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=1"]
    msg = _error([*base, "--max_itres=3"])
    assert "'max_itres'" in msg and "valid keys" in msg and "max_iters" in msg
    msg = _error([*base, "--batch_size=2.5"])
    assert "'batch_size'" in msg and "int" in msg
    msg = _error([*base, f"--data_dir={tmp_path / 'nowhere'}"])
    assert "nowhere" in msg and "meta.json" in msg
    msg = _error([*base, "--init_from=qwen3", f"--qwen3_path={tmp_path / 'no_qwen3'}"])
    assert "no_qwen3" in msg
    small = write_synthetic(str(tmp_path / "small_vocab"), vocab_size=151936)
    msg = _error([*base, f"--data_dir={small}"])
    assert "vocab_size 151936" in msg and "152036" in msg
    msg = _error([*base, "--parallelism=zero3"])
    assert "'parallelism'" in msg and "fsdp" in msg
    msg = _error([*base, "--init_from=resume"])
    assert "no checkpoint" in msg
    assert not out.exists()  # nothing was written


def test_command_line_error_is_one_line_and_nonzero(tmp_path, data_dir):
    p = subprocess.run([sys.executable, "train.py", *TINY, f"--data_dir={tmp_path / 'nowhere'}",
                        f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error:") and "nowhere" in lines[0], p.stderr


def test_existing_checkpoints_are_not_overwritten_by_a_new_run(tmp_path, data_dir):
    out = tmp_path / "out"
    run(*TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=1")
    msg = _error([*TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=1"])
    assert "--init_from=resume" in msg


def test_non_finite_loss_skips_steps_then_stops(tmp_path, data_dir, capsys):
    out = tmp_path / "out"
    # a huge learning rate blows the weights up after the first step; later losses are inf/nan
    with pytest.raises(train.Fail, match="non-finite losses in a row"):
        run(*TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=20", "--warmup_iters=0",
            "--learning_rate=1e30", "--grad_clip=0", "--max_bad_steps=3", "--ckpt_interval=1")
    assert capsys.readouterr().out.count("step skipped") == 3
    ckpts = train.list_checkpoints(str(out))
    last = json.loads(open(os.path.join(ckpts[-1], "trainer_state.json")).read())
    assert last["bad_steps"] < 3  # the run stopped before writing a checkpoint after the last bad step
    EncoderDecoder.from_pretrained(ckpts[-1])


# ---------------------------------------------------------------------------------------
# 6. kill -9 during checkpoint writes

def writing(out):
    return out.exists() and any(n.startswith("ckpt-") and n.endswith(".tmp") for n in os.listdir(out))


@pytest.mark.slow
def test_kill_during_checkpoint_write_never_leaves_a_loadable_half_checkpoint(tmp_path, data_dir):
    """Checkpoint every step, kill -9 at random moments once writing has begun, six times over;
    every checkpoint under a complete name must load in full, and resume must work after each kill."""
    out = tmp_path / "out"
    argv = [sys.executable, "train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=1000",
            "--ckpt_interval=1", "--keep_last=2"]
    rng = random.Random(0)
    killed_mid_write = 0
    for attempt in range(6):
        seen = set(os.listdir(out)) if out.exists() else set()
        cmd = argv + (["--init_from=resume"] if train.list_checkpoints(str(out)) else [])
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 120  # until this process starts its first checkpoint write
        while time.time() < deadline and p.poll() is None and not (
                out.exists() and any(n.startswith("ckpt-") and n not in seen for n in os.listdir(out))):
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 1.5))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        killed_mid_write += writing(out)
        for ckpt in train.list_checkpoints(str(out)):  # every complete name loads in full
            EncoderDecoder.from_pretrained(ckpt)
            state, optim, rng_state = train.read_checkpoint(ckpt)
            assert optim and "rng.torch.0" in rng_state and state["iter"] == int(ckpt[-7:])
    assert killed_mid_write > 0  # some kills really landed inside a write
    before = train.list_checkpoints(str(out))[-1]
    run(*TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--init_from=resume",
        f"--max_iters={int(before[-7:]) + 1}", "--ckpt_interval=1", "--keep_last=2")
    assert not writing(out)


# ---------------------------------------------------------------------------------------
# 4. torchrun: ddp / zero1 / fsdp equal one process; checkpoints move between them

def torchrun(args, nproc=2):
    port = str(29500 + os.getpid() % 1000)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           "train.py", *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "zero1", "fsdp"])
def test_two_processes_equal_one(tmp_path, data_dir, parallelism):
    # two micro-steps per process, so gradient accumulation without sync is exercised too
    common = [*TINY, f"--data_dir={data_dir}", "--grad_accum=4", "--max_iters=5", "--eval_interval=5",
              "--eval_iters=3"]
    run(*common, f"--out_dir={tmp_path / 'one'}")
    torchrun([*common, f"--out_dir={tmp_path / 'two'}", f"--parallelism={parallelism}"])
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    one_loss, two_loss = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one_loss) == [1, 2, 3, 4, 5]
    for i in one_loss:
        assert abs(one_loss[i] - two_loss[i]) <= 1e-5, (i, one_loss[i], two_loss[i])
    one_val = [r for r in one if "val_loss" in r]
    two_val = [r for r in two if "val_loss" in r]
    for a, b in zip(one_val, two_val):
        for k in a:
            assert abs(a[k] - b[k]) <= 1e-5, k
    assert_same_tensors(weights(tmp_path / "one" / "ckpt-0000005"), weights(tmp_path / "two" / "ckpt-0000005"),
                        atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["fsdp", "zero1"])
def test_sharded_checkpoint_resumes_in_one_process_and_back(tmp_path, data_dir, parallelism):
    common = [*TINY, f"--data_dir={data_dir}", "--grad_accum=2", "--lr_decay_iters=6", "--ckpt_interval=3"]
    run(*common, f"--out_dir={tmp_path / 'ref'}", "--max_iters=6")
    ref = losses(tmp_path / "ref")
    # two sharded processes write, one process resumes
    torchrun([*common, f"--out_dir={tmp_path / 'a'}", f"--parallelism={parallelism}", "--max_iters=3"])
    run(*common, f"--out_dir={tmp_path / 'a'}", "--max_iters=6", "--init_from=resume")
    # one process writes, two sharded processes resume
    run(*common, f"--out_dir={tmp_path / 'b'}", "--max_iters=3")
    torchrun([*common, f"--out_dir={tmp_path / 'b'}", f"--parallelism={parallelism}", "--max_iters=6",
              "--init_from=resume"])
    for out in ("a", "b"):
        got = losses(tmp_path / out)
        # 2 processes sum gradients in another order than 1; Adam's m / sqrt(v) magnifies that in near-zero
        # gradients, so the losses drift by 1e-5..5e-5 over a few steps whoever wrote the checkpoint (CI has
        # seen 4.3e-5); a resume that drops the optimizer state moves iters 5-6 by 2e-3..6e-3 (measured), ten
        # times this tolerance
        for i in range(1, 7):
            assert abs(got[i] - ref[i]) <= 2e-4, (out, i, got[i], ref[i])
        # the same drift in weights: CI has seen max 3.5e-4 (a near-zero-gradient embedding row), mean 2.2e-7;
        # dropping the optimizer state on resume gives max 5.9e-3, mean 1.1e-3 (measured)
        assert_same_tensors(weights(tmp_path / out / "ckpt-0000006"), weights(tmp_path / "ref" / "ckpt-0000006"),
                            atol=1e-3)
