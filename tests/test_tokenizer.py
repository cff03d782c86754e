"""tokenizer.py against an independent reference: a Hugging Face `tokenizers` byte-level BPE
built from the shared Qwen3 vocab.json + merges.txt (not from our ranks)."""
import json
import os
import unicodedata

import pytest

from conftest import shared_data_dir
import tokenizer as T

QWEN_DIR = os.path.join(shared_data_dir(), "qwen3_tokenizer")
need_shared = pytest.mark.skipif(not os.path.isdir(QWEN_DIR), reason=f"shared data not found at {QWEN_DIR}")

MIXED = [
    "Hello world", "",
    "你好，世界！这是一个测试。日本語のテキストも。한국어 문장.",
    "def f(x):\n\tif x >= 10:\n\t\treturn x ** 2  # square\n    return {'a': [1, 2, 3]}\r\n",
    "emoji 🙂🙂🙂 👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ✨",
    "e\u0301 cafe\u0301 A\u030a n\u0303 — precomposed é Å ñ",
    "spaces:" + " " * 37 + "end" + "\n" * 9 + "\t \t  \n\n\n   x" + " " * 100,
    "we're READY, I'M here! they'LL've don't 1234567 3.14159 0x1F",
    "<|im_start|>user\nHi<|im_end|><think>\n</think><|endoftext|>",
    "mixed\u00a0nbsp\u2003em-space\u200bzero-width\u2028line-sep\ufeffbom",
    "ÀÉÎÕÜ ß ẞ ǅ ﬁ Ω Ωmega ΑΒΓ Дом «ёлка»",
]


def reference_tokenizer(with_added=True):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    ref = Tokenizer(models.BPE.from_file(os.path.join(QWEN_DIR, "vocab.json"), os.path.join(QWEN_DIR, "merges.txt")))
    ref.normalizer = normalizers.NFC()
    with open(os.path.join(QWEN_DIR, "qwen3_added_tokens.json"), encoding="utf-8") as f:
        spec = json.load(f)
    ref.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec["pretokenizer_regex"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    ref.decoder = decoders.ByteLevel()
    if with_added:
        for t in spec["added_tokens"]:
            ref.add_tokens([AddedToken(t["content"], special=t["special"], normalized=False)])
            assert ref.token_to_id(t["content"]) == t["id"]
    return ref


@pytest.fixture(scope="module")
def tok():
    return T.load_tokenizer()


@pytest.fixture(scope="module")
def ref():
    return reference_tokenizer()


@pytest.fixture(scope="module")
def hf_dir(tok, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("hf_tok"))
    tok.save_hf(d)
    return d


def stsb_sentences():
    out = []
    for name in ("stsb_train.tsv", "stsb_dev.tsv", "stsb_test.tsv"):
        with open(os.path.join(shared_data_dir(), "sts", name), encoding="utf-8") as f:
            for line in f.read().splitlines()[1:]:
                out += line.split("\t")[1:3]
    return out


def test_constants_and_layout(tok):
    assert tok.vocab_size == T.VOCAB_SIZE == 152036 and tok.eos_id == tok.pad_id == 151643
    assert [tok.sentinel_id(i) for i in (0, 1, 99)] == [151936, 151937, 152035]
    with pytest.raises(ValueError):
        tok.sentinel_id(100)
    assert len(T.QWEN3_SPECIAL_TOKENS) == 26
    assert sorted(i for i, _ in T.ADDED_TOKENS.values()) == [*range(151643, 151672), *range(151936, 152036)]


@need_shared
def test_constants_match_shared_added_tokens():
    with open(os.path.join(QWEN_DIR, "qwen3_added_tokens.json"), encoding="utf-8") as f:
        spec = json.load(f)
    assert [(t["id"], t["content"], t["special"]) for t in spec["added_tokens"]] == [
        (T.ADDED_TOKENS[c][0], c, T.ADDED_TOKENS[c][1]) for c in T.QWEN3_SPECIAL_TOKENS]
    assert spec["pretokenizer_regex"] == T.PRETOKENIZE_REGEX


@need_shared
def test_package_ranks_equal_vocab_json(tok):
    with open(os.path.join(QWEN_DIR, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    assert {T._to_bytelevel(t): i for t, i in tok.ranks.items()} == vocab


@pytest.mark.parametrize("text,ids", [  # SOURCES.md "Verification"
    ("Hello world", [9707, 1879]),
    ("Hello, world! 12345", [9707, 11, 1879, 0, 220, 16, 17, 18, 19, 20]),
    ("  spaced  text\n", [220, 63828, 220, 1467, 198]),
    ("你好，世界！", [108386, 3837, 99489, 6313]),
    ("we're READY, I'M here!", [896, 2299, 85332, 11, 358, 27603, 1588, 0]),
    ("e\u0301 cafe\u0301 — 你好，世界🙂", [963, 51950, 1959, 220, 108386, 3837, 99489, 145080]),
    ("<|im_start|>user\nHello<|im_end|>", [151644, 872, 198, 9707, 151645]),
])
def test_published_reference_encodings(tok, text, ids):
    assert tok.encode(text) == ids
    assert tok.encode_batch([text, text]) == [ids, ids]


@need_shared
def test_parity_tiny_shakespeare(tok, ref):
    with open(os.path.join(shared_data_dir(), "corpus", "tiny_shakespeare.txt"), encoding="utf-8") as f:
        text = f.read()
    ids = tok.encode(text)
    assert ids == ref.encode(text).ids
    assert tok.decode(ids) == text


@need_shared
def test_parity_stsb(tok, ref):
    sentences = stsb_sentences()
    assert len(sentences) == 2 * (5749 + 1500 + 1379)
    ids = tok.encode_batch(sentences)
    assert ids == [e.ids for e in ref.encode_batch(sentences)]
    assert [tok.decode(x) for x in ids] == [unicodedata.normalize("NFC", s) for s in sentences]


@need_shared
def test_parity_mixed_and_roundtrip(tok, ref):
    for text in MIXED:
        ids = tok.encode(text)
        assert ids == ref.encode(text).ids, text
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)


@need_shared
def test_special_strings_plain_when_not_allowed(tok):
    plain_ref = reference_tokenizer(with_added=False)
    text = "x<|endoftext|>y <extra_id_3> <|ul2_S|> <think>"
    ids = tok.encode(text, allow_special=False)
    assert ids == plain_ref.encode(text).ids and max(ids) < T.NUM_BPE_RANKS
    assert tok.decode(ids) == text


def test_encode_documents_equals_one_by_one(tok):
    # the prepare path joins documents with <|endoftext|> for speed; it must equal encoding each alone
    docs = MIXED[2:] + ["quotes <|endoftext|> literally", "  ", "ends in spaces   ", "\n\n", "<|im_end|>x"] * 9
    want = [i for d in docs for i in tok.encode(d, allow_special=False) + [T.EOS_ID]]
    tok.num_threads = 3  # several chunks
    try:
        assert tok.encode_documents(docs).tolist() == want
    finally:
        tok.num_threads = os.cpu_count() or 1
    assert tok.encode_documents(docs[:1]).dtype == "uint32"


def test_sentinels_and_mode_tokens(tok):
    text = "The <extra_id_0> sat on <extra_id_99>.<|ul2_R|><|ul2_X|><|ul2_S|>"
    ids = tok.encode(text)
    for i in (0, 99):
        assert ids.count(tok.sentinel_id(i)) == 1
    assert [i for i in ids if i in T.MODE_IDS.values()] == [151669, 151670, 151671]
    assert tok.decode(ids) == text
    assert tok.decode([tok.sentinel_id(7)]) == "<extra_id_7>"
    # unused embedding rows render readably; ids outside the vocabulary are an error
    assert tok.decode([9707, 151700, 1879]) == "Hello<|unused_151700|> world"
    with pytest.raises(ValueError, match="152036"):
        tok.decode([152036])


def test_fingerprint_tracks_ranks(tok):
    tokens = tok._bpe_tokens()
    assert T._fingerprint(tokens, T.PRETOKENIZE_REGEX) == tok.fingerprint
    tokens[9707], tokens[1879] = tokens[1879], tokens[9707]
    assert T._fingerprint(tokens, T.PRETOKENIZE_REGEX) != tok.fingerprint


@need_shared
def test_save_hf_matches_shared_files(tok, hf_dir):
    with open(os.path.join(hf_dir, "tokenizer.json"), encoding="utf-8") as f:
        model = json.load(f)["model"]
    with open(os.path.join(QWEN_DIR, "merges.txt"), encoding="utf-8") as f:
        merges = [tuple(m.split(" ")) for m in f.read().splitlines()[1:]]
    assert [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]] == merges


def test_save_hf_autotokenizer_same_ids(tok, hf_dir):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(hf_dir)
    texts = MIXED + ["fill <extra_id_0> and <extra_id_42> <|ul2_X|> then<|endoftext|>"]
    for text in texts:
        ids = tok.encode(text)
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids) == tok.decode(ids)
    assert hf.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)]) == list(range(151936, 152036))
    assert hf.eos_token_id == hf.pad_token_id == T.EOS_ID
    # our loader on the saved directory: same ids, same fingerprint
    again = T.load_tokenizer(hf_dir)
    assert again.encode_batch(texts) == tok.encode_batch(texts)
    assert again.encode(texts[-1], allow_special=False) == tok.encode(texts[-1], allow_special=False)
    assert again.fingerprint == tok.fingerprint
    assert again.encode_documents(texts).tolist() == tok.encode_documents(texts).tolist()
    assert again.decode([9707, 151700, 151937]) == tok.decode([9707, 151700, 151937])


@need_shared
def test_load_plain_qwen3_hf_dir_adds_sentinels(tok, ref, tmp_path):
    # a Qwen3 tokenizer directory as Hugging Face ships it: BPE + the 26 added tokens only
    ref.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    hf = T.load_tokenizer(str(tmp_path))
    texts = MIXED + ["a <extra_id_5> b <|ul2_R|>"]
    assert hf.encode_batch(texts) == tok.encode_batch(texts)
    assert hf.fingerprint == tok.fingerprint


def test_load_rejects_non_qwen_layout(tmp_path):
    from tokenizers import Tokenizer, models
    bad = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}, merges=[("a", "b")]))
    bad.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(ValueError, match="<\\|endoftext\\|> has id 3, expected 151643"):
        T.load_tokenizer(str(tmp_path))


OFFSET_TEXTS = MIXED + [
    "e\u0301 cafe\u0301 A\u030a n\u0303 \u0344x\u2126 \u1100\u1161\u11a8z a\u0301\u0316b \u1e0b\u0323",  # NFC changes
    "emoji 🙂🙂 👩‍👩‍👧 ok  ñ", "a<|endoftext|>b <extra_id_0> c<|ul2_R|>",
]


def squad_contexts():
    path = os.path.join(shared_data_dir(), "qa", "squad_train_subset_v1.1.json")
    if not os.path.isfile(path):
        pytest.skip(f"{path} not found")
    with open(path, encoding="utf-8") as f:
        return [p["context"] for a in json.load(f)["data"] for p in a["paragraphs"]]


def test_offsets_match_hf_fast_tokenizer(tok, hf_dir):
    # the reference: transformers' fast tokenizer on the files save_hf wrote
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(hf_dir)
    again = T.load_tokenizer(hf_dir)
    for text in OFFSET_TEXTS:
        want = hf(text, return_offsets_mapping=True)
        ids, offsets = tok.encode_offsets(text)
        assert ids == want["input_ids"] == tok.encode(text), text
        assert offsets == [tuple(o) for o in want["offset_mapping"]], text
        assert again.encode_offsets(text) == (ids, offsets)
    # a character split over two tokens: both span it; tokens cover the text in order
    assert tok.encode_offsets("x 👩")[1] == [(0, 1), (1, 3), (2, 3)]
    plain = "x<|endoftext|>y"
    assert tok.encode_offsets(plain, allow_special=False) == (
        hf(plain, return_offsets_mapping=True, split_special_tokens=True)["input_ids"],
        [tuple(o) for o in hf(plain, return_offsets_mapping=True, split_special_tokens=True)["offset_mapping"]])
    assert tok.encode_offsets("") == ([], [])


@need_shared
def test_offsets_match_hf_on_squad_contexts(tok, hf_dir):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(hf_dir)
    contexts = squad_contexts()
    want = hf(contexts, return_offsets_mapping=True)
    got = tok.encode_batch_offsets(contexts)
    for i, (ids, offsets) in enumerate(got):
        assert ids == want["input_ids"][i]
        assert offsets == [tuple(o) for o in want["offset_mapping"][i]], contexts[i][:80]
    # every token's text is what its ids decode to (no NFC change in these contexts)
    ids, offsets = got[0]
    assert "".join(contexts[0][a:b] for a, b in offsets) == contexts[0] == tok.decode(ids)
