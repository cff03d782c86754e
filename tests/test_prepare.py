"""The prepare scripts end to end, as a user runs them (subprocesses, real tokenizer)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import unicodedata

import numpy as np
import pytest

from conftest import shared_data_dir
from shards import ShardDataset
from tokenizer import EOS_ID, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLIMPAJAMA = os.path.join(ROOT, "data", "slimpajama_6b_qwen3", "prepare.py")
SHAKESPEARE = os.path.join(ROOT, "data", "shakespeare_qwen3", "prepare.py")
SHAKESPEARE_TXT = os.path.join(shared_data_dir(), "corpus", "tiny_shakespeare.txt")


def run(script, *args, **kw):
    return subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, cwd=ROOT, **kw)


def documents_of(data_dir, split):
    """Decode a split back into documents: the stream is doc <|endoftext|> doc <|endoftext|> ..."""
    ids = np.concatenate([np.asarray(s) for s in ShardDataset(str(data_dir), split).shards])
    ends = np.flatnonzero(ids == EOS_ID)
    assert len(ends) and ends[-1] == len(ids) - 1
    tok = load_tokenizer()
    return [tok.decode(ids[a + 1 if a >= 0 else 0:b]) for a, b in zip([-1, *ends[:-1]], ends)]


def test_local_input_roundtrip(tmp_path):
    docs = ["A plain text file.\nTwo lines, café e\u0301.\n",
            "first jsonl doc 你好", "quoted special strings stay text: <|endoftext|> <extra_id_1> <|ul2_R|>",
            "", "emoji 🙂 and   spaces\n\n\n", "x", "last one"]
    (tmp_path / "a.txt").write_text(docs[0], encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[1:]), encoding="utf-8")
    out = tmp_path / "out"
    r = run(SLIMPAJAMA, "--input", tmp_path / "a.txt", tmp_path / "b.jsonl", "--out", out,
            "--val_every", 3, "--tokens_per_shard", 7)
    assert r.returncode == 0, r.stderr
    nfc = [unicodedata.normalize("NFC", d) for d in docs]
    want = {"val": [d for i, d in enumerate(nfc) if i % 3 == 0 and d],
            "train": [d for i, d in enumerate(nfc) if i % 3 != 0 and d]}
    for split in want:
        assert documents_of(out, split) == want[split]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == load_tokenizer().fingerprint and meta["tokens_per_shard"] == 7
    assert meta["splits"]["train"]["num_docs"] == 4 and meta["splits"]["val"]["num_docs"] == 3
    assert all(e["num_tokens"] == 7 for e in meta["splits"]["train"]["shards"][:-1])


def feed_fifo(path, text, wait_before_pass=(), stop_at=None, release=None):
    """Writer side of a named pipe. prepare opens its input once per split (train, then val),
    so each pass writes the text once; wait_before_pass[i]() must hold before pass i+1 opens
    the pipe (else it could append to the previous reader's stream). With stop_at, the single
    pass stops there and holds the pipe open until `release` is set."""
    def write():
        for i in range(len(wait_before_pass) + 1):
            if i:
                while not wait_before_pass[i - 1]():
                    time.sleep(0.02)
            try:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text[:stop_at])
                    f.flush()
                    if release is not None:
                        release.wait()
            except BrokenPipeError:
                return
    th = threading.Thread(target=write, daemon=True)
    th.start()
    return th


def split_complete(out, split):
    try:
        return json.loads((out / "meta.json").read_text())["splits"][split]["complete"]
    except (OSError, ValueError, KeyError):
        return False


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE_TXT), reason=f"{SHAKESPEARE_TXT} not found")
def test_sigkill_mid_run_then_rerun_is_byte_identical(tmp_path):
    with open(SHAKESPEARE_TXT, encoding="utf-8") as f:
        lines = f.read().split("\n")[:16000]
    jsonl = "".join(json.dumps({"text": line}) + "\n" for line in lines)
    args = ["--val_every", 10, "--tokens_per_shard", 5000]
    (tmp_path / "docs.jsonl").write_text(jsonl, encoding="utf-8")
    clean = tmp_path / "clean"
    r = run(SLIMPAJAMA, "--input", tmp_path / "docs.jsonl", "--out", clean, *args)
    assert r.returncode == 0, r.stderr

    # the input is a named pipe that stops half way without closing: the run cannot finish,
    # so the kill lands mid-split with shards on disk and a partly filled buffer
    fifo, out = tmp_path / "fifo.jsonl", tmp_path / "killed"
    os.mkfifo(fifo)
    release = threading.Event()
    writer = feed_fifo(fifo, jsonl, stop_at=len(jsonl) // 2, release=release)
    proc = subprocess.Popen([sys.executable, SLIMPAJAMA, "--input", fifo, "--out", out, *map(str, args)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out / "train_000002.bin").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "prepare exited before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    release.set()
    writer.join()
    meta = json.loads((out / "meta.json").read_text())
    done = len(meta["splits"]["train"]["shards"])
    assert not meta["complete"] and 2 <= done < 12

    writer = feed_fifo(fifo, jsonl, wait_before_pass=[lambda: split_complete(out, "train")])
    r = run(SLIMPAJAMA, "--input", fifo, "--out", out, *args, timeout=120)
    writer.join()
    assert r.returncode == 0, r.stderr
    assert f"resuming after {done} shards" in r.stdout + r.stderr
    names = sorted(n for n in os.listdir(clean) if n.endswith(".bin"))
    assert names == sorted(n for n in os.listdir(out) if n.endswith(".bin")) and len(names) > 12
    for n in names:
        assert (clean / n).read_bytes() == (out / n).read_bytes(), n


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE_TXT), reason=f"{SHAKESPEARE_TXT} not found")
def test_shakespeare_prepare(tmp_path):
    out = tmp_path / "shakespeare"
    r = run(SHAKESPEARE, "--out", out)
    assert r.returncode == 0, r.stderr
    with open(SHAKESPEARE_TXT, encoding="utf-8") as f:
        text = f.read()
    train, val = documents_of(out, "train"), documents_of(out, "val")
    assert len(train) == len(val) == 1 and train[0] + val[0] == text
    assert 0.09 < len(val[0]) / len(text) < 0.11 and val[0].startswith(("\n", "")) and train[0].endswith("\n")
    r = run(os.path.join(ROOT, "shards.py"), "check", out)
    assert r.returncode == 0 and "val:" in r.stdout


def test_help_lists_options():
    r = run(SLIMPAJAMA, "--help")
    assert r.returncode == 0
    for opt in ("--out", "--input", "--workers", "--tokens_per_shard", "--max_docs"):
        assert opt in r.stdout


def last_line(stderr):
    return stderr.strip().splitlines()[-1]


def test_bad_input_exits_nonzero_with_one_line(tmp_path):
    r = run(SLIMPAJAMA, "--input", tmp_path / "missing.txt", "--out", tmp_path / "o1")
    assert r.returncode == 1 and last_line(r.stderr) == f"error: {tmp_path / 'missing.txt'}: no such file"
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n[1, 2]\n')
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    r = run(SLIMPAJAMA, "--input", tmp_path / "bad.jsonl", tmp_path / "latin1.txt", "--out", tmp_path / "o2")
    assert r.returncode == 1 and last_line(r.stderr).startswith(f"error: {tmp_path / 'bad.jsonl'}:2: ")
    r = run(SLIMPAJAMA, "--input", tmp_path / "latin1.txt", "--out", tmp_path / "o3")
    assert r.returncode == 1 and last_line(r.stderr).startswith(f"error: {tmp_path / 'latin1.txt'}: not UTF-8")
    r = run(SHAKESPEARE, tmp_path / "latin1.txt", "--out", tmp_path / "o4")
    assert r.returncode == 1 and last_line(r.stderr).startswith(f"error: {tmp_path / 'latin1.txt'}: not UTF-8")
