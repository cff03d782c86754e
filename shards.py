"""Writer and reader of uint32 token shards.

A dataset directory holds train_000000.bin, ..., val_000000.bin, ... (raw little-endian
uint32 token ids: Qwen3 ids exceed 65,535) and meta.json. Every document is followed by
<|endoftext|>; empty documents are dropped. All shards of a split hold exactly
tokens_per_shard tokens except the last.

Writing is resumable: after each shard, meta.json records where in the document stream that
shard ends (document index + tokens of that document already written), so a rerun skips
finished shards and carries on from there, giving byte-identical output. Shards and
meta.json are written under a .tmp name and renamed, so a final name is always complete.
meta.json says "complete": true only once every split is done.

Reading validates cheaply: meta present and compatible, each file's byte size, and ids below
the vocabulary. The id scan runs once per shard; its result (max id) is cached in meta.json
keyed by the file's size and mtime, and the writer fills that cache as it writes.

    python shards.py check DIR    validates a dataset directory (non-zero exit if bad)
"""
import json
import os
import sys
import time

import numpy as np

DTYPE = "uint32"
TOKEN = np.dtype("<u4")  # little-endian on every machine
SPLITS = ("train", "val")
META = "meta.json"
SCAN_CHUNK = 1 << 24  # tokens per chunk of the id scan (64 MB)


class ShardError(ValueError):
    """Bad input to, or bad output of, data preparation: a one-line message naming the file."""


def shard_name(split, index):
    return f"{split}_{index:06d}.bin"


def _write_atomic(path, data, sync=False):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        if sync:  # a shard's bytes reach the disk before meta.json can point at them
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_meta(data_dir, meta):
    _write_atomic(os.path.join(data_dir, META), json.dumps(meta, indent=1).encode())


def _regenerate_hint(data_dir, meta=None):
    """The command that made a dataset (recorded in meta.json), else the likeliest prepare.py."""
    cmd = (meta or {}).get("command")
    if cmd:
        return f"`{cmd}`"
    if os.path.exists(os.path.join(data_dir, "prepare.py")):
        return f"`python {os.path.join(data_dir, 'prepare.py')}`"
    return f"the prepare.py that made it (e.g. `python data/shakespeare_qwen3/prepare.py --out {data_dir}`)"


def read_meta(data_dir):
    path = os.path.join(data_dir, META)
    if not os.path.exists(path):
        raise ShardError(f"{path}: missing; (re)generate the dataset with {_regenerate_hint(data_dir)}")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:  # includes JSONDecodeError and bad UTF-8
        raise ShardError(f"{path}: unreadable ({e}); delete {data_dir} and regenerate with "
                         f"{_regenerate_hint(data_dir)}") from None
    return meta


def scan_max_id(path, num_tokens):
    """Largest id in a shard, read in chunks so a shard never sits in memory whole."""
    if num_tokens == 0:
        return -1
    data = np.memmap(path, dtype=TOKEN, mode="r", shape=(num_tokens,))
    return max(int(data[i:i + SCAN_CHUNK].max()) for i in range(0, num_tokens, SCAN_CHUNK))


def check_shard(data_dir, entry, vocab_size, meta):
    """Validate one shard against its meta entry; returns True if the id-scan cache was refreshed."""
    path = os.path.join(data_dir, entry["file"])
    hint = _regenerate_hint(data_dir, meta)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ShardError(f"{path}: missing; rerun {hint} to rewrite it") from None
    want = entry["num_tokens"] * 4
    if st.st_size != want:
        what = "not a whole number of uint32 tokens" if st.st_size % 4 else "truncated or wrong dtype"
        raise ShardError(f"{path}: {st.st_size} bytes, expected {want} ({entry['num_tokens']} uint32 tokens; "
                         f"{what}); rerun {hint} to rewrite it")
    refreshed = False
    if entry.get("checked") != [st.st_size, st.st_mtime_ns]:
        entry["max_id"] = scan_max_id(path, entry["num_tokens"])
        entry["checked"] = [st.st_size, st.st_mtime_ns]
        refreshed = True
    if entry["max_id"] >= vocab_size:
        raise ShardError(f"{path}: holds token id {entry['max_id']} >= vocab size {vocab_size}; "
                         f"rerun {hint} to rewrite it")
    return refreshed


class ShardDataset:
    """One split of a dataset directory: validated memmaps of its shards."""

    def __init__(self, data_dir, split, vocab_size=None):
        meta = read_meta(data_dir)
        meta_path = os.path.join(data_dir, META)
        hint = _regenerate_hint(data_dir, meta)
        if meta.get("dtype") != DTYPE:
            raise ShardError(f"{meta_path}: dtype {meta.get('dtype')!r}, expected {DTYPE!r}; "
                             f"delete {data_dir} and regenerate with {hint}")
        if not meta.get("complete") or not meta.get("splits", {}).get(split, {}).get("complete", True):
            raise ShardError(f"{meta_path}: preparation did not finish; rerun {hint} to resume it")
        if split not in meta.get("splits", {}):
            raise ShardError(f"{meta_path}: no split {split!r} (has {sorted(meta.get('splits', {}))}); "
                             f"regenerate with {hint}")
        self.vocab_size = vocab_size or meta["vocab_size"]
        entries = meta["splits"][split]["shards"]
        refreshed = [check_shard(data_dir, e, self.vocab_size, meta) for e in entries]
        if any(refreshed):
            try:  # best effort: a read-only dataset is simply scanned again next time
                _save_meta(data_dir, meta)
            except OSError:
                pass
        self.meta = meta
        self.files = [os.path.join(data_dir, e["file"]) for e in entries if e["num_tokens"]]
        self.shard_tokens = [e["num_tokens"] for e in entries if e["num_tokens"]]
        self.num_tokens = sum(self.shard_tokens)
        if self.num_tokens == 0:
            raise ShardError(f"{meta_path}: split {split!r} has no tokens; regenerate with more input via {hint}")
        self.shards = [np.memmap(f, dtype=TOKEN, mode="r", shape=(n,))
                       for f, n in zip(self.files, self.shard_tokens)]

    def window(self, shard_index, start, length):
        n = self.shard_tokens[shard_index]
        if start < 0 or length < 0 or start + length > n:
            raise IndexError(f"window [{start}, {start + length}) outside {self.files[shard_index]} ({n} tokens)")
        return np.array(self.shards[shard_index][start:start + length])


# ---------------------------------------------------------------------------------------
# writing

def tokenize_documents(tokenizer, docs):
    """The prepare path's tokenization: one uint32 array of every document's ids, each followed
    by <|endoftext|> (special-token strings inside documents stay text), and the end offset of
    each document in it."""
    flat = tokenizer.encode_documents(docs)
    ends = np.flatnonzero(flat == tokenizer.eos_id) + 1
    assert len(ends) == len(docs), "a document's text encoded to <|endoftext|>"
    return flat, ends


def _batches(docs, max_chars, max_docs):
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= max_chars or len(batch) >= max_docs:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _open_meta(out_dir, settings):
    """Existing meta.json when its settings match (a resume), else a fresh one."""
    path = os.path.join(out_dir, META)
    if not os.path.exists(path):
        return dict(settings, complete=False,
                    splits={s: {"shards": [], "num_docs": 0, "num_tokens": 0, "complete": False} for s in SPLITS})
    meta = read_meta(out_dir)
    for key, value in settings.items():
        if key != "command" and meta.get(key) != value:
            raise ShardError(f"{path}: made with {key}={json.dumps(meta.get(key))}, now {json.dumps(value)}; "
                             f"delete {out_dir} or choose another --out")
    return meta


def _keep_valid_prefix(out_dir, state, vocab_size, meta):
    """Keep the listed shards up to the first one that fails validation; resume rewrites the rest."""
    for k, entry in enumerate(state["shards"]):
        try:
            check_shard(out_dir, entry, vocab_size, meta)
        except ShardError as e:
            print(f"{e}: rewriting from there", file=sys.stderr)
            state["shards"] = state["shards"][:k]
            state["complete"] = False
            return


def _write_split(out_dir, meta, split, docs_from, tokenizer, batch_chars, batch_docs):
    from tqdm import tqdm
    state = meta["splits"][split]
    _keep_valid_prefix(out_dir, state, meta["vocab_size"], meta)
    if state["complete"]:
        print(f"{split}: already complete, {state['num_tokens']:,} tokens in {len(state['shards'])} shards")
        return
    per_shard = meta["tokens_per_shard"]
    buf = np.empty(per_shard, dtype=TOKEN)
    fill = 0

    def flush(end_doc, end_offset):
        nonlocal fill
        entry = {"file": shard_name(split, len(state["shards"])), "num_tokens": fill,
                 "end_doc": end_doc, "end_offset": end_offset}
        path = os.path.join(out_dir, entry["file"])
        _write_atomic(path, memoryview(buf[:fill]), sync=True)
        st = os.stat(path)
        entry["max_id"] = int(buf[:fill].max())
        entry["checked"] = [st.st_size, st.st_mtime_ns]
        state["shards"].append(entry)
        _save_meta(out_dir, meta)  # the resume point moves only once the shard is in place
        fill = 0

    # resume point: documents before skip_docs, and skip_tokens tokens of the next one, are on disk
    last = state["shards"][-1] if state["shards"] else {"end_doc": 0, "end_offset": 0}
    skip_docs, skip_tokens = last["end_doc"], last["end_offset"]
    done_tokens = sum(e["num_tokens"] for e in state["shards"])
    bar = tqdm(desc=split, unit=" docs", initial=skip_docs, dynamic_ncols=True)
    if skip_docs or skip_tokens:
        bar.write(f"{split}: resuming after {len(state['shards'])} shards, at document {skip_docs:,}")
    t0, new_tokens, doc_index = time.time(), 0, skip_docs
    for batch in _batches(docs_from(skip_docs), batch_chars, batch_docs):
        index = [doc_index + i for i, d in enumerate(batch) if d]  # empty documents hold no tokens
        flat, ends = tokenize_documents(tokenizer, [d for d in batch if d])
        pos = skip_tokens if doc_index == skip_docs else 0  # the resumed document's written part
        new_tokens += len(flat) - pos
        while pos < len(flat):
            n = min(per_shard - fill, len(flat) - pos)
            buf[fill:fill + n] = flat[pos:pos + n]
            fill, pos = fill + n, pos + n
            if fill == per_shard:
                j = int(np.searchsorted(ends, pos))  # the document holding the shard's last token
                start = ends[j - 1] if j else 0
                flush(*((index[j] + 1, 0) if pos == ends[j] else (index[j], int(pos - start))))
        doc_index += len(batch)
        bar.update(len(batch))
        rate = new_tokens / max(time.time() - t0, 1e-9)
        bar.set_postfix_str(f"{done_tokens + new_tokens:,} tokens, {rate:,.0f} tok/s")
    if fill:
        flush(doc_index, 0)
    bar.close()
    state.update(complete=True, num_docs=doc_index, num_tokens=sum(e["num_tokens"] for e in state["shards"]))
    _save_meta(out_dir, meta)
    if state["num_tokens"] == 0:
        print(f"warning: split {split!r} is empty", file=sys.stderr)


def prepare(out_dir, splits, tokenizer, tokens_per_shard, source, command=None,
            batch_chars=1 << 22, batch_docs=4096):
    """Tokenize and write every split of a dataset into out_dir, resuming a previous run.

    splits maps "train"/"val" to a function docs_from(start) that yields the split's documents
    (str) from index `start` on, the same documents in the same order on every call. `source`
    (JSON) says where they came from; a rerun with another source, tokenizer or shard size
    is refused rather than mixed in."""
    if tokens_per_shard < 1:
        raise ShardError(f"tokens_per_shard must be positive, got {tokens_per_shard}")
    os.makedirs(out_dir, exist_ok=True)
    settings = {"dtype": DTYPE, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                "tokenizer": tokenizer.fingerprint, "tokens_per_shard": tokens_per_shard,
                "source": source, "command": command}
    meta = _open_meta(out_dir, settings)
    meta.update(command=command, complete=False)
    for name in os.listdir(out_dir):  # leftovers of a killed run
        if name.endswith(".tmp") and name.startswith((*SPLITS, META)):
            os.remove(os.path.join(out_dir, name))
    for split in SPLITS:
        _write_split(out_dir, meta, split, splits[split], tokenizer, batch_chars, batch_docs)
    meta["complete"] = True
    _save_meta(out_dir, meta)
    return meta


# ---------------------------------------------------------------------------------------
# local input files (shared by the prepare scripts)

def check_inputs(paths):
    for path in paths:
        if not os.path.exists(path) or os.path.isdir(path):
            raise ShardError(f"{path}: no such file")


def read_documents(paths):
    """Documents of local files: each line of a .jsonl file is a JSON object whose "text" is a
    document (blank lines skipped); any other file is one UTF-8 plain-text document."""
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                if not path.endswith(".jsonl"):
                    yield f.read()
                    continue
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (ValueError, KeyError, TypeError):
                        text = None
                    if not isinstance(text, str):
                        raise ShardError(f"{path}:{lineno}: not a JSON object with a string \"text\" field")
                    yield text
        except UnicodeDecodeError as e:
            raise ShardError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def local_splits(paths, val_every, max_docs=None):
    """Split local documents: every val_every-th one (starting with the first) goes to val."""
    import itertools

    def split_docs(split):
        def docs_from(start):
            picked = (d for i, d in enumerate(read_documents(paths)) if (i % val_every == 0) == (split == "val"))
            return itertools.islice(picked, start, max_docs)
        return docs_from
    return {split: split_docs(split) for split in SPLITS}


def input_source(paths, **settings):
    """What meta.json records about local inputs, so a resume cannot mix in other files."""
    return dict(inputs=[[os.path.abspath(p), os.path.getsize(p)] for p in paths], **settings)


# ---------------------------------------------------------------------------------------
# command line

def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description="Validate a uint32 shard dataset directory.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("check", help="validate meta.json, every shard's size and ids; exit 1 if bad")
    check.add_argument("data_dir")
    check.add_argument("--vocab_size", type=int, default=None, help="ids must be below this (default: meta's)")
    args = parser.parse_args(argv)
    try:
        meta = read_meta(args.data_dir)
        for split in meta.get("splits", {}):
            ds = ShardDataset(args.data_dir, split, args.vocab_size)
            print(f"{split}: {ds.num_tokens:,} tokens in {len(ds.shards)} shards, ids < {ds.vocab_size}: ok")
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
