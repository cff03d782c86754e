"""checkpoint.py: the atomic write, the newest-complete rule against real damage, one-line errors for a
truncated checkpoint, SIGTERM that checkpoints and exits 0, the schedule note on resume; and (slow) a
2-process FSDP run that saves sharded, resumes bitwise in 2 processes, and whose consolidated checkpoint
loads in 1-process train, sample and extract."""
import json
import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import optim
import shards
import train
from conftest import ROOT
from model import EncoderDecoder
from model_config import get_preset
from tokenizer import EOS_ID, VOCAB_SIZE

TINY = ["--model_preset=tiny_encdec", "--batch_size=2", "--enc_len=48", "--dec_len=32", "--eval_interval=0",
        "--log_interval=1", "--warmup_iters=1", "--learning_rate=3e-3", "--device=cpu", "--seed=7"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


class Ints:
    """Synthetic shards: documents are space-separated ids."""
    vocab_size, eos_id, fingerprint = VOCAB_SIZE, EOS_ID, "synthetic-ints"

    def encode_batch(self, docs, allow_special=False):
        return [[int(t) for t in d.split()] for d in docs]

    def encode_documents(self, docs):
        return np.array([i for ids in self.encode_batch(docs) for i in ids + [EOS_ID]], dtype=np.uint32)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic"))
    rng = np.random.default_rng(0)
    texts = [" ".join(map(str, np.tile(p, 200 // len(p) + 1)[:200]))
             for p in (rng.integers(0, 300, size=rng.integers(5, 20)) for _ in range(40))]
    shards.prepare(out, {"train": lambda s: iter(texts[s:30]), "val": lambda s: iter(texts[30 + s:])}, Ints(),
                   tokens_per_shard=4000, source={"synthetic": 0})
    return out


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {r["iter"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def small(seed=0):
    torch.manual_seed(seed)
    model = EncoderDecoder(get_preset("tiny_encdec", vocab_size=300))
    opt = optim.make_optimizer(model, train.SimpleNamespace(optimizer="adamw", learning_rate=1e-2, beta1=0.9,
                                                            beta2=0.95, weight_decay=0.1, parallelism="ddp"), 1)
    ids = torch.randint(0, 300, (2, 8))
    model(ids, torch.ones_like(ids, dtype=torch.bool), ids, labels=ids)[1].backward()
    opt.step()
    return model, opt


# ---------------------------------------------------------------------------------------
# the atomic write and the rule

def test_write_atomic_leaves_the_old_file_or_the_new_one(tmp_path):
    path = str(tmp_path / "a.json")
    checkpoint.write_json(path, {"v": 1})

    def dies(tmp):
        with open(tmp, "w") as f:
            f.write('{"v": 2, "half')
        raise KeyboardInterrupt  # killed in the middle of the write
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_atomic(path, dies)
    assert json.load(open(path)) == {"v": 1}  # the old content, whole
    checkpoint.write_json(path, {"v": 3})  # the next write clears the leftover
    assert json.load(open(path)) == {"v": 3} and os.listdir(tmp_path) == ["a.json"]
    # a directory is replaced whole too
    d = str(tmp_path / "d")
    checkpoint.write_atomic(d, lambda t: (os.makedirs(t), open(os.path.join(t, "x"), "w").write("1")))
    checkpoint.write_atomic(d, lambda t: (os.makedirs(t), open(os.path.join(t, "y"), "w").write("2")))
    assert os.listdir(d) == ["y"] and sorted(os.listdir(tmp_path)) == ["a.json", "d"]


def test_newest_skips_damaged_checkpoints_with_one_line_naming_the_file(tmp_path):
    from safetensors import SafetensorError
    model, opt = small()
    out = str(tmp_path)
    for it in (1, 2, 3):
        checkpoint.save(out, it, model, opt, {"iter": it})
    os.makedirs(os.path.join(out, "ckpt-0000004.tmp"))  # a write in progress never counts
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(out)] == ["ckpt-0000001", "ckpt-0000002",
                                                                            "ckpt-0000003"]
    assert checkpoint.newest(out) == os.path.join(out, "ckpt-0000003")
    # cut model.safetensors of the newest short, and trainer_state.safetensors of the one before
    for it, name in ((3, "model.safetensors"), (2, "trainer_state.safetensors")):
        f = os.path.join(out, f"ckpt-{it:07d}", name)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) - 100)
        with pytest.raises(SafetensorError):  # the damage is real: safetensors itself refuses the file
            load_file(f)
    said = []
    assert checkpoint.newest(out, log=said.append) == os.path.join(out, "ckpt-0000001")
    assert len(said) == 1 and "ckpt-0000003/model.safetensors is truncated" in said[0] and "ckpt-0000001" in said[0]
    with pytest.raises(checkpoint.CheckpointError, match="ckpt-0000002/trainer_state.safetensors is truncated"):
        checkpoint.check(os.path.join(out, "ckpt-0000002"))
    os.remove(os.path.join(out, "ckpt-0000001", "config.json"))
    with pytest.raises(checkpoint.CheckpointError, match="ckpt-0000003/model.safetensors is truncated"):
        checkpoint.newest(out)  # nothing complete left: the newest one's problem


def test_truncated_checkpoint_resume_is_one_line(tmp_path, data_dir):
    out = tmp_path / "out"
    train.main([*TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=1"])
    f = out / "ckpt-0000001" / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    p = subprocess.run([sys.executable, "train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}",
                        "--max_iters=2", "--init_from=resume"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=ENV)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error:"), p.stderr
    assert "ckpt-0000001/model.safetensors is truncated" in lines[0] and "Traceback" not in p.stdout + p.stderr


# ---------------------------------------------------------------------------------------
# SIGTERM: checkpoint at the next step, exit 0, resume

def test_sigterm_checkpoints_at_the_next_step_exits_0_and_resumes(tmp_path, data_dir, capsys):
    out = tmp_path / "out"
    common = [*TINY, f"--data_dir={data_dir}", "--ckpt_interval=0", "--lr_decay_iters=1000"]
    p = subprocess.Popen([sys.executable, "train.py", *common, f"--out_dir={out}", "--max_iters=1000"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    for line in p.stdout:  # the run is in its loop: iteration 2 is done
        if line.startswith("iter 2/"):
            break
    p.send_signal(signal.SIGTERM)
    rest, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    stopped = [line for line in rest.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(stopped) == 1, rest
    ckpts = checkpoint.list_checkpoints(str(out))
    assert len(ckpts) == 1
    n = int(ckpts[0][-7:])
    assert n >= 2 and f"checkpoint {ckpts[0]}" in rest and f"at iter {n}" in stopped[0]
    # it resumes exactly: the same losses and weights as a run that was never stopped
    capsys.readouterr()
    train.main([*common, f"--out_dir={out}", f"--max_iters={n + 1}", "--init_from=resume"])
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resuming at iter")]
    assert len(note) == 1 and f"max_iters 1000 -> {n + 1}" in note[0], note
    train.main([*common, f"--out_dir={tmp_path / 'straight'}", f"--max_iters={n + 1}"])
    assert losses(out) == losses(tmp_path / "straight")
    a, b = (load_file(str(d / f"ckpt-{n + 1:07d}" / "model.safetensors")) for d in (out, tmp_path / "straight"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_schedule_note_says_how_the_learning_rate_moves():
    c = train.SimpleNamespace(max_iters=200, lr_decay_iters=0, warmup_iters=10, learning_rate=1e-3, min_lr=1e-4)
    saved = {"max_iters": 100, "lr_decay_iters": 0, "warmup_iters": 10, "learning_rate": 1e-3, "min_lr": 1e-4}
    note = train.schedule_change(saved, c, 50)
    old = train.get_lr(50, train.SimpleNamespace(**saved))
    assert "max_iters 100 -> 200" in note and "ends at iter 200 (was 100)" in note
    assert f"{old:.3e} -> {train.get_lr(50, c):.3e}" in note and old < train.get_lr(50, c)
    assert train.schedule_change(saved, train.SimpleNamespace(**saved), 50) is None
    fixed = {**saved, "lr_decay_iters": 150}  # the cosine's end is set: a longer run only adds min_lr iterations
    note = train.schedule_change(fixed, train.SimpleNamespace(**{**fixed, "max_iters": 200}), 50)
    assert "max_iters 100 -> 200" in note and "schedule is unchanged (the cosine ends at 150)" in note


# ---------------------------------------------------------------------------------------
# 2 processes, FSDP: sharded save, bitwise resume, consolidation read by 1-process train, sample, extract

def torchrun(args):
    port = str(29700 + os.getpid() % 500)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def shard_tensors(ckpt):
    """Every tensor of a sharded checkpoint, whole, read in this one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    path = os.path.join(ckpt, "shards")
    meta = FileSystemReader(path).read_metadata().state_dict_metadata
    sd = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items() if hasattr(m, "size")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
        dcp.load(sd, checkpoint_id=path, no_dist=True)
    return sd


@pytest.mark.slow
def test_fsdp_sharded_checkpoint_resumes_bitwise_and_consolidates(tmp_path, data_dir):
    common = [*TINY, f"--data_dir={data_dir}", "--grad_accum=2", "--lr_decay_iters=4", "--ckpt_interval=2",
              "--parallelism=fsdp"]
    torchrun([*common, f"--out_dir={tmp_path / 'straight'}", "--max_iters=4"])
    torchrun([*common, f"--out_dir={tmp_path / 'split'}", "--max_iters=2"])
    mid = tmp_path / "split" / "ckpt-0000002"
    # sharded: one file per process, no model.safetensors until the run's end consolidates it
    names = sorted(os.listdir(mid / "shards"))
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp"], names
    assert "trainer_state.safetensors" not in os.listdir(mid)
    torchrun([*common, f"--out_dir={tmp_path / 'split'}", "--max_iters=4", "--init_from=resume"])
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    a, b = (shard_tensors(tmp_path / d / "ckpt-0000004") for d in ("straight", "split"))
    assert a.keys() == b.keys() and any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng."))
    last = tmp_path / "split" / "ckpt-0000004"
    full = load_file(str(last / "model.safetensors"))  # consolidated at the end of the run
    assert full.keys() == {k[len("model."):] for k in a if k.startswith("model.")}
    assert all(torch.equal(full[k], a[f"model.{k}"]) for k in full)
    assert not (tmp_path / "straight" / "ckpt-0000002" / "model.safetensors").exists()  # only a run's last is

    # the consolidated checkpoint in one process: train resumes, sample and extract read it
    run = train.main([*TINY, f"--data_dir={data_dir}", "--grad_accum=2", "--lr_decay_iters=4",
                      f"--out_dir={tmp_path / 'split'}", "--max_iters=5", "--init_from=resume"])
    assert run["iter"] == 5 and np.isfinite(losses(tmp_path / "split")[5])
    s = subprocess.run([sys.executable, "sample.py", "--ckpt", str(last), "--prompt", "a <extra_id_0> b",
                        "--max_new_tokens", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert s.returncode == 0 and s.stdout.strip(), s.stderr[-2000:]
    e = subprocess.run([sys.executable, "extract.py", "--ckpt", str(last), "--out", str(tmp_path / "encoder")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert e.returncode == 0, e.stderr[-2000:]
    enc = load_file(str(tmp_path / "encoder" / "model.safetensors"))
    assert torch.equal(enc["embed.weight"], full["embed.weight"])


@pytest.mark.slow
def test_consolidate_command_and_an_unconsolidated_checkpoint_in_sample(tmp_path, data_dir):
    out = tmp_path / "out"
    torchrun([*TINY, f"--data_dir={data_dir}", "--grad_accum=2", "--ckpt_interval=1", "--max_iters=2",
              "--parallelism=zero1", f"--out_dir={out}"])
    mid = out / "ckpt-0000001"
    with pytest.raises(checkpoint.CheckpointError, match="consolidate"):
        checkpoint.resolve(str(mid))  # sample / extract need model.safetensors: the one line says how
    p = subprocess.run([sys.executable, "checkpoint.py", "consolidate", str(mid)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=ENV)
    assert p.returncode == 0 and p.stdout.strip() == f"consolidated {mid}/model.safetensors", p.stdout + p.stderr
    m = EncoderDecoder.from_pretrained(str(mid))
    sd = shard_tensors(mid)
    assert all(torch.equal(v, sd[f"model.{k}"]) for k, v in m.state_dict().items())
    assert checkpoint.resolve(str(out)) == str(out / "ckpt-0000002")
