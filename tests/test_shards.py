"""shards.py: the writer (fixed-size shards, resume) and the reader's validation, with a
character tokenizer whose token stream is easy to compute by hand."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import shards
from shards import ShardDataset, ShardError, prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 999


class CharTokenizer:
    """ids = code points; records what it was asked to encode."""
    vocab_size, eos_id, pad_id, fingerprint = 1000, EOS, EOS, "chars-v1"

    def __init__(self):
        self.seen = []

    def encode_documents(self, texts):
        self.seen += texts
        return np.array([i for t in texts for i in [*map(ord, t), EOS]], dtype=np.uint32)


DOCS = {"train": [f"doc {i}: " + "abcdefg"[: i % 7] * (i % 5) for i in range(40)] + [""] + ["tail"],
        "val": ["v1", "", "val two", "val three!"]}


def expected_stream(docs):
    out = []
    for d in docs:
        if d:  # empty documents are dropped, without an <|endoftext|>
            out += [ord(c) for c in d] + [EOS]
    return np.array(out, dtype=np.uint32)


def splits_of(docs, stop_after=None):
    """docs_from(start) functions; with stop_after, the stream is interrupted after that many docs."""
    def make(split):
        def docs_from(start):
            for i, d in enumerate(docs[split][start:], start):
                if stop_after is not None and split == "train" and i >= stop_after:
                    raise KeyboardInterrupt
                yield d
        return docs_from
    return {s: make(s) for s in shards.SPLITS}


def run(out, tok=None, per_shard=16, stop_after=None, batch_docs=3):
    return prepare(str(out), splits_of(DOCS, stop_after), tok or CharTokenizer(), per_shard,
                   source={"test": 1}, command="python make_it.py", batch_docs=batch_docs)


def files_of(d):
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d)) if n.endswith(".bin")}


def shard_lists(d):
    meta = json.load(open(os.path.join(d, "meta.json")))
    return {s: [{k: v for k, v in e.items() if k != "checked"} for e in meta["splits"][s]["shards"]]
            for s in shards.SPLITS}


@pytest.fixture
def clean(tmp_path):
    run(tmp_path / "clean")
    return tmp_path / "clean"


def test_roundtrip_fixed_size_shards_and_meta(clean):
    meta = json.load(open(clean / "meta.json"))
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 1000 and meta["tokenizer"] == "chars-v1"
    assert meta["tokens_per_shard"] == 16 and meta["complete"]
    for split in shards.SPLITS:
        ds = ShardDataset(str(clean), split)
        want = expected_stream(DOCS[split])
        assert ds.num_tokens == len(want) == meta["splits"][split]["num_tokens"]
        assert meta["splits"][split]["num_docs"] == len(DOCS[split])
        assert all(isinstance(s, np.memmap) and s.dtype == np.uint32 for s in ds.shards)
        assert [len(s) for s in ds.shards[:-1]] == [16] * (len(ds.shards) - 1) and 0 < len(ds.shards[-1]) <= 16
        assert np.array_equal(np.concatenate([np.asarray(s) for s in ds.shards]), want)
        last = len(ds.shards[-1])
        assert np.array_equal(ds.window(len(ds.shards) - 1, 1, last - 1), want[len(want) - last + 1:])
        with pytest.raises(IndexError):
            ds.window(0, 10, 7)
    assert np.array_equal(ShardDataset(str(clean), "train").window(1, 3, 10), expected_stream(DOCS["train"])[19:29])
    # raw little-endian uint32 on disk
    assert np.array_equal(np.fromfile(clean / "train_000000.bin", dtype="<u4"), expected_stream(DOCS["train"])[:16])


@pytest.mark.parametrize("stop_after", [0, 1, 7, 23, 41])
def test_interrupted_run_resumes_byte_identical(clean, tmp_path, stop_after):
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(out, stop_after=stop_after)
    meta = json.load(open(out / "meta.json")) if (out / "meta.json").exists() else {"complete": False}
    assert not meta["complete"]
    tok = CharTokenizer()
    run(out, tok)
    assert files_of(out) == files_of(clean) and shard_lists(out) == shard_lists(clean)
    # finished shards were skipped: the resumed run tokenized only documents from the resume point on
    done = meta.get("splits", {}).get("train", {}).get("shards", [])
    first = done[-1]["end_doc"] if done else 0
    rest = [d for d in DOCS["train"][first:] if d]
    assert tok.seen[:len(rest)] == rest


def test_kill_between_shard_rename_and_meta(clean, tmp_path):
    # a shard already renamed into place but not yet recorded, and a stray temp file
    out = tmp_path / "killed"
    run(out)
    meta = json.load(open(out / "meta.json"))
    meta["complete"] = False
    meta["splits"]["train"]["complete"] = False
    meta["splits"]["train"]["shards"] = meta["splits"]["train"]["shards"][:3]
    meta["splits"]["val"] = {"shards": [], "num_docs": 0, "num_tokens": 0, "complete": False}
    (out / "meta.json").write_text(json.dumps(meta))
    (out / "train_000004.bin.123.tmp").write_bytes(b"partial")
    tok = CharTokenizer()
    run(out, tok)
    assert files_of(out) == files_of(clean) and not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert DOCS["train"][0] not in tok.seen


def test_rerun_of_complete_dataset_does_nothing(clean):
    tok = CharTokenizer()
    before = files_of(clean)
    run(clean, tok)
    assert tok.seen == [] and files_of(clean) == before


def test_rerun_with_other_settings_refused(clean):
    with pytest.raises(ShardError, match="meta.json: made with tokens_per_shard=16, now 8"):
        run(clean, per_shard=8)


def test_resume_rewrites_corrupt_shard(clean):
    path = clean / "train_000002.bin"
    data = np.fromfile(path, dtype=np.uint32)
    data[5] = 5000
    data.tofile(path)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    good = files_of(clean)
    good["train_000002.bin"] = expected_stream(DOCS["train"])[32:48].tobytes()
    run(clean)
    assert files_of(clean) == good


def corrupt(d, kind):
    """Damage a finished dataset; returns the file the error must name."""
    shard, meta_path = d / "train_000001.bin", d / "meta.json"
    meta = json.load(open(meta_path))
    if kind == "truncated":
        shard.write_bytes(shard.read_bytes()[:-6])
        return shard
    if kind == "uint16_file":  # same tokens written as uint16: half the bytes meta promises
        np.fromfile(shard, dtype=np.uint32).astype(np.uint16).tofile(shard)
        return shard
    if kind == "uint16_meta":
        meta["dtype"] = "uint16"
    elif kind == "id_too_big":
        data = np.fromfile(shard, dtype=np.uint32)
        data[-1] = 1000
        data.tofile(shard)
        # a later edit than the validation cached in meta (mtime can tick coarsely)
        os.utime(shard, ns=(os.stat(shard).st_atime_ns, os.stat(shard).st_mtime_ns + 10**9))
        return shard
    elif kind == "missing_meta":
        meta_path.unlink()
        return meta_path
    elif kind == "missing_shard":
        shard.unlink()
        return shard
    elif kind == "incomplete":
        meta["complete"] = False
    elif kind == "garbage_meta":
        meta_path.write_text("{not json")
        return meta_path
    meta_path.write_text(json.dumps(meta))
    return meta_path


KINDS = ["truncated", "uint16_file", "uint16_meta", "id_too_big", "missing_meta", "missing_shard",
         "incomplete", "garbage_meta"]


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_dataset_one_line_error(clean, kind):
    bad = corrupt(clean, kind)
    with pytest.raises(ShardError) as e:
        ShardDataset(str(clean), "train")
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg
    # how to regenerate: the recorded command, or a prepare.py when meta.json is unreadable
    assert ("prepare.py" if kind in ("missing_meta", "garbage_meta") else "python make_it.py") in msg


@pytest.mark.parametrize("kind", ["truncated", "id_too_big", "missing_meta"])
def test_check_cli_exits_nonzero(clean, kind):
    bad = corrupt(clean, kind)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "shards.py"), "check", str(clean)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and str(bad) in r.stderr


def test_check_cli_ok(clean):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "shards.py"), "check", str(clean)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "train:" in r.stdout and "val:" in r.stdout


def test_vocab_size_argument(clean):
    max_id = int(expected_stream(DOCS["train"]).max())
    assert ShardDataset(str(clean), "train", vocab_size=max_id + 1).num_tokens > 0
    with pytest.raises(ShardError, match=f"holds token id {max_id} >= vocab size {max_id}"):
        ShardDataset(str(clean), "train", vocab_size=max_id)


def test_id_scan_is_chunked_and_cached(clean, monkeypatch):
    scans = []
    real_scan = shards.scan_max_id
    monkeypatch.setattr(shards, "SCAN_CHUNK", 5)
    monkeypatch.setattr(shards, "scan_max_id", lambda p, n: scans.append(p) or real_scan(p, n))
    ShardDataset(str(clean), "train")
    assert scans == []  # the writer filled the cache
    meta = json.load(open(clean / "meta.json"))
    for e in meta["splits"]["train"]["shards"]:
        e.pop("checked")
    (clean / "meta.json").write_text(json.dumps(meta))
    ShardDataset(str(clean), "train")
    assert len(scans) == len(meta["splits"]["train"]["shards"])
    ShardDataset(str(clean), "train")  # the scan result went back into meta.json
    assert len(scans) == len(meta["splits"]["train"]["shards"])
    # a bad id in the last chunk of a shard is found
    shard = clean / "train_000000.bin"
    data = np.fromfile(shard, dtype=np.uint32)
    data[-1] = 4000
    data.tofile(shard)
    os.utime(shard, ns=(os.stat(shard).st_atime_ns, os.stat(shard).st_mtime_ns + 10**9))
    with pytest.raises(ShardError, match="4000"):
        ShardDataset(str(clean), "train")


def test_local_documents(tmp_path):
    (tmp_path / "a.txt").write_text("plain doc\nwith two lines\n")
    (tmp_path / "b.jsonl").write_text('{"text": "j0"}\n\n{"text": "j1", "id": 3}\n{"text": "j2"}\n')
    paths = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    assert list(shards.read_documents(paths)) == ["plain doc\nwith two lines\n", "j0", "j1", "j2"]
    splits = shards.local_splits(paths, val_every=3)
    assert list(splits["val"](0)) == ["plain doc\nwith two lines\n", "j2"]
    assert list(splits["train"](0)) == ["j0", "j1"] and list(splits["train"](1)) == ["j1"]
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ShardError, match="c.jsonl:2: not a JSON object"):
        list(shards.read_documents([str(tmp_path / "c.jsonl")]))
    (tmp_path / "d.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ShardError, match="d.txt: not UTF-8"):
        list(shards.read_documents([str(tmp_path / "d.txt")]))
