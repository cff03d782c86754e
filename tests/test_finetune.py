"""finetune.py and hf_qa.py: the SQuAD metric by hand, span round trips over every SQuAD answer, evidence
matching, windows, starting points against transformers / the project's encoder, training, export through
the transformers pipeline."""
import json
import os
import unicodedata

import pytest
import torch

import finetune as F
import model as M
import tokenizer as T

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return T.load_tokenizer()


# ---------------------------------------------------------------------------------------
# metric

def squad(*qas):
    """A SQuAD `data` list: one article, one paragraph per (id, [gold answers])."""
    return [{"title": "t", "paragraphs": [
        {"context": "c", "qas": [{"id": i, "question": "q", "answers": [{"text": g, "answer_start": 0} for g in golds]}]}
        for i, golds in qas]}]


def test_squad_scores_hand_computed(tmp_path, capsys):
    data = squad(("1", ["The Cat", "a dog"]), ("2", ["New York City"]), ("3", ["1,000 people", "about 1000"]),
                 ("4", ["x"]), ("5", ["missing"]), ("6", ["an apple"]), ("7", ["a"]))
    preds = {"1": "cat!",                  # articles and punctuation dropped, case folded: EM 1, F1 1
             "2": "the city of New York",  # {city, of, new, york} vs {new, york, city}: P 3/4, R 1 -> F1 6/7
             "3": "1000",                  # "1,000 people" -> "1000 people": P 1, R 1/2 -> F1 2/3 (either gold)
             "4": "",                      # empty prediction: 0, 0
             "6": "Apple.",                # EM 1
             "7": "the"}                   # both normalise to "": EM 1, but F1 0 (no common token)
    # question 5 has no prediction: it counts, with 0
    want_em = 100 * (1 + 0 + 0 + 0 + 0 + 1 + 1) / 7
    want_f1 = 100 * (1 + 6 / 7 + 2 / 3 + 0 + 0 + 1 + 0) / 7
    got = F.squad_scores(data, preds)
    assert got == pytest.approx({"exact_match": want_em, "f1": want_f1}, abs=1e-9)
    assert F.normalize_answer("  The  Quick, brown-fox; an\tA ") == "quick brownfox"
    # the scoring command reads files and prints the same numbers
    (tmp_path / "data.json").write_text(json.dumps({"version": "1.1", "data": data}))
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    F.main(["score", str(tmp_path / "data.json"), str(tmp_path / "pred.json")])
    out = capsys.readouterr().out
    assert json.loads(out) == pytest.approx({"exact_match": want_em, "f1": want_f1}, abs=1e-9)
    with pytest.raises(SystemExit) as e:
        F.main(["score", str(tmp_path / "pred.json"), str(tmp_path / "pred.json")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "pred.json" in err


# ---------------------------------------------------------------------------------------
# spans

def test_char_token_char_round_trip_every_squad_answer(tok, shared_data):
    _, examples = F.load_squad(os.path.join(shared_data, "qa", "squad_train_subset_v1.1.json"))
    contexts = list(dict.fromkeys(e["context"] for e in examples))
    encoded = dict(zip(contexts, F.encode_contexts(tok, contexts)))
    for c in contexts[:200]:  # splitting punctuation keeps the text
        assert tok.decode(encoded[c][0]) == unicodedata.normalize("NFC", c)
    total, exact, failures = 0, 0, []
    for e in examples:
        for text, a0 in e["answers"]:
            total += 1
            offsets = encoded[e["context"]][1]
            first, last = F.char_to_token(offsets, a0, a0 + len(text))
            s, t = F.token_to_char(e["context"], offsets, first, last)
            assert s <= a0 and t >= a0 + len(text), (e["id"], text, e["context"][s:t])  # always contains it
            exact += (s, t) == (a0, a0 + len(text))
            if (s, t) != (a0, a0 + len(text)):
                failures.append((e["id"], text, e["context"][s:t]))
    assert total == 11877
    assert exact / total >= 0.995, failures
    # the misses are answers that begin or end inside a word ("six" of "sixth"), nothing else
    for _, text, got in failures:
        assert text in got and len(got) > len(text)


def test_windows_and_labels(tok):
    context = " ".join(f"Sentence {i} tells that item{i} weighs {i * 7} kilograms." for i in range(40))
    answer = "item31 weighs 217"
    ex = {"id": "x", "question": "What weighs 217?", "context": context,
          "answers": [(answer, context.index(answer))]}
    feats = F.qa_features(tok, [ex], max_len=64, doc_stride=16, max_query_len=8)
    ctx_ids, ctx_off = F.encode_contexts(tok, [context])[0]
    q = tok.encode(ex["question"])
    covered, hits = [], 0
    for f in feats:
        assert len(f["ids"]) <= 64 and f["ids"][:len(q) + 1] == q + [T.EOS_ID] and f["ids"][-1] == T.EOS_ID
        start = ctx_off.index(f["offsets"][0])
        covered.append((start, start + len(f["offsets"])))
        assert f["ids"][f["ctx_start"]:-1] == ctx_ids[start:start + len(f["offsets"])]
        if f["start"] == len(f["ids"]) - 1:
            assert f["end"] == f["start"]  # null: the window lacks the answer
            continue
        hits += 1
        cs = f["ctx_start"]
        s, t = F.token_to_char(context, f["offsets"], f["start"] - cs, f["end"] - cs)
        assert context[s:t] == answer
    assert hits >= 1
    assert covered[0][0] == 0 and covered[-1][1] == len(ctx_ids)
    for (a, b), (c, d) in zip(covered, covered[1:]):
        assert c == b - 16  # consecutive windows share doc_stride tokens
    with pytest.raises(ValueError, match="doc_stride"):
        F.qa_features(tok, [ex], max_len=20, doc_stride=16, max_query_len=8)


def test_best_answers_hand_made_logits(tok):
    context = "Ann met Bob in Paris in 1999."
    ex = {"id": "q", "question": "Where?", "context": context, "answers": []}
    f, = F.qa_features(tok, [ex], max_len=64)
    words = [context[a:b] for a, b in f["offsets"]]
    cs = f["ctx_start"]
    start, end = torch.zeros(len(f["ids"])), torch.zeros(len(f["ids"]))
    start[cs + words.index(" Paris")] = 5.0
    end[cs + words.index(" Paris")] = 6.0  # Paris..Paris scores 5 + 6 > Ann..Bob 0 + 9
    end[cs + words.index(" Bob")] = 9.0  # best end, but before the best start: not a valid span
    start[len(f["ids"]) - 1] = 20.0      # the null position never becomes an answer
    preds, nbest = F.best_answers([ex], [f], [(start.numpy(), end.numpy())], n_best=3, max_answer_len=5)
    assert preds == {"q": "Paris"}
    assert nbest["q"][0]["start"] == context.index("Paris") and nbest["q"][0]["end"] == context.index("Paris") + 5
    assert [a["score"] for a in nbest["q"]] == sorted([a["score"] for a in nbest["q"]], reverse=True)


def test_find_evidence():
    post = ("I have been feeling tired for weeks. My doctor said my iron levels were quite low last spring. "
            "Since then I take supplements every morning with orange juice. The weather here is mostly rainy.")
    exact = "My doctor said my iron levels were quite low last spring."
    assert F.find_evidence(post, exact) == (post.index(exact), post.index(exact) + len(exact), 1.0)
    perturbed = {  # typos, a changed word, case and spacing, a dropped word
        "my doctr said my iron level were quite  low last spring": exact,
        "Since then I take supplements every evening with orange juice.":
            "Since then I take supplements every morning with orange juice.",
        "SINCE THEN i take suplements every morning with juice.":
            "Since then I take supplements every morning with orange juice.",
    }
    for ev, sentence in perturbed.items():
        s, e, r = F.find_evidence(post, ev)
        assert 0.8 <= r < 1.0
        assert abs(s - post.index(sentence)) <= 3 and abs(e - post.index(sentence) - len(sentence)) <= 3, post[s:e]
    for unrelated in ("The stock market fell sharply on Tuesday afternoon.", "I love my cat.",
                      "tired weeks doctor iron supplements morning juice weather rainy"):
        assert F.find_evidence(post, unrelated) is None
    assert F.find_evidence(post, "   ") is None
    # a SQuAD file whose answers lack answer_start gets them located
    s, e, _ = F.find_evidence(post, "orange juise")
    assert post[s:e] == "orange juice."


def test_load_squad_locates_evidence(tmp_path):
    context = "The bridge was finished in 1932 after six years of work by 1,400 labourers."
    data = {"data": [{"title": "b", "paragraphs": [{"context": context, "qas": [
        {"id": "1", "question": "When?", "answers": [{"text": "finished in 1932"}]},
        {"id": "2", "question": "Who?", "answers": [{"text": "1400 laborers"}]},
        {"id": "3", "question": "What?", "answers": [{"text": "a completely unrelated phrase here"}]}]}]}]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    _, ex = F.load_squad(str(path))
    assert ex[0]["answers"] == [("finished in 1932", context.index("finished"))]
    text, start = ex[1]["answers"][0]
    assert context[start:start + len(text)] == text and text.startswith("1,400 labourers")
    assert ex[2]["answers"] == []


# ---------------------------------------------------------------------------------------
# starting points and the task model

def test_starting_points(hf_qwen3_dir, tmp_path):
    from transformers import Qwen3Model
    ids = torch.tensor([[9707, 1879, 11, 358, 1079, 264, 1273, 13]])
    # a Hugging Face Qwen3 directory: causal is exactly transformers' Qwen3
    enc = F.load_encoder(hf_qwen3_dir)
    ref = Qwen3Model.from_pretrained(hf_qwen3_dir).eval()
    with torch.no_grad():
        want = ref(ids).last_hidden_state
        torch.testing.assert_close(enc.hidden(ids, attn="causal"), want, atol=1e-5, rtol=1e-5)
        bi = enc.hidden(ids, attn="bidirectional")
        assert not torch.allclose(bi[:, 0], want[:, 0], atol=1e-3)  # the first token now sees the others
    # a UL2 checkpoint (and its out_dir): bidirectional is the encoder-decoder's encoder
    ed = M.EncoderDecoder.from_qwen3(hf_qwen3_dir)
    with torch.no_grad():  # train the encoder apart from the decoder a little, so mixing them up shows
        for p in ed.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ckpt = tmp_path / "run" / "ckpt-0000010"
    ed.save_pretrained(str(ckpt))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        want = ed.encode(ids, mask)[mask]
        for path in (ckpt, tmp_path / "run"):
            got = F.load_encoder(str(path)).hidden(ids, mask, attn="bidirectional")[mask]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # an extract.py directory
    out = tmp_path / "encoder"
    import extract
    extract.main(["--ckpt", str(ckpt), "--out", str(out)])
    with torch.no_grad():
        got = F.load_encoder(str(out)).hidden(ids, mask, attn="bidirectional")[mask]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        F.load_encoder(str(tmp_path / "nope"))


def test_padding_side_pooling_dropout(hf_qwen3_dir, tok):
    rows = [tok.encode("A man plays a guitar on the street."), tok.encode("Hi")]
    for attn in ("bidirectional", "causal"):
        for task, pooling in (("qa", "mean"), ("classify", "mean"), ("classify", "last"), ("regress", "cls")):
            torch.manual_seed(0)
            m = F.TaskModel(F.load_encoder(hf_qwen3_dir), task, attn, pooling).eval()
            outs = {}
            for side in ("right", "left"):
                ids, mask, shift = F.collate(rows, side)
                with torch.no_grad():
                    y = m(ids, mask)
                if task == "qa":  # per real token, wherever the padding sits
                    y = [y[0][b, int(shift[b]):int(shift[b]) + len(r)] for b, r in enumerate(rows)]
                outs[side] = y
            for a, b in zip(outs["right"], outs["left"]):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # last pooling reads the last real token (alone: the same as a batch of one)
    m = F.TaskModel(F.load_encoder(hf_qwen3_dir), "classify", "causal", "last").eval()
    with torch.no_grad():
        alone = m(torch.tensor([rows[1]]), torch.ones(1, len(rows[1]), dtype=torch.bool))
        ids, mask, _ = F.collate(rows, "right")
        torch.testing.assert_close(m(ids, mask)[1:], alone, atol=1e-5, rtol=1e-4)
    # dropout acts in train mode only
    m.encoder.set_dropout(attn=0.3, hidden=0.3)
    m.train()
    with torch.no_grad():
        assert not torch.allclose(m(ids, mask), m(ids, mask))
        m.eval()
        torch.testing.assert_close(m(ids, mask), m(ids, mask))


# ---------------------------------------------------------------------------------------
# training and export

def test_qa_training_memorises(hf_qwen3_dir, tok, shared_data):
    # overfitting a handful of questions proves features, labels, loss and decoding fit together
    _, examples = F.load_squad(os.path.join(shared_data, "qa", "squad_train_subset_v1.1.json"))
    examples = [e for e in examples if len(e["context"]) < 500][:8]
    torch.manual_seed(0)
    model = F.TaskModel(F.load_encoder(hf_qwen3_dir), "qa", "bidirectional")
    feats = F.qa_features(tok, examples, max_len=128, doc_stride=32)
    settings = {"max_seq_length": 128, "doc_stride": 32, "max_query_length": 64, "markers": False,
                "padding_side": "right", "n_best": 20, "max_answer_length": 30}
    before, _ = F.predict_qa(model, tok, examples, settings)

    class Args:
        lr, weight_decay, warmup, epochs, max_steps, max_minutes, batch_size, log_interval, seed = \
            3e-3, 0.0, 0.1, 1, 25, 0, 8, 5, 0
    info = F.train_loop(model, feats, lambda fs: F.qa_loss(model, fs, "right"), Args, lambda msg: None)
    assert info["steps"] == 25 and info["last_loss"] < 0.3 * info["first_loss"]
    after, _ = F.predict_qa(model, tok, examples, settings)
    data = [{"paragraphs": [{"qas": [{"id": e["id"], "answers": [{"text": t} for t, _ in e["answers"]]}]}
                            for e in examples]}]
    assert F.squad_scores(data, after)["f1"] >= 80 > F.squad_scores(data, before)["f1"]


@pytest.mark.parametrize("attn,side,markers", [("bidirectional", "right", False), ("causal", "left", True)])
def test_export_pipeline_gives_project_answers(hf_qwen3_dir, tok, tmp_path, attn, side, markers):
    from transformers import AutoModelForQuestionAnswering, pipeline
    torch.manual_seed(1)
    model = F.TaskModel(F.load_encoder(hf_qwen3_dir), "qa", attn)
    if markers:
        F.init_marker_rows(model.encoder)
    with torch.no_grad():
        model.qa_head.weight.normal_(0, 1.0)  # clear margins between spans
    settings = {"attn": attn, "max_seq_length": 48, "doc_stride": 12, "max_query_length": 16,
                "max_answer_length": 10, "n_best": 5, "markers": markers, "padding_side": side}
    out = str(tmp_path / "qa")
    F.export_qa(model, out, settings)
    loaded, got_settings = F.load_qa(out)
    assert got_settings == settings
    contexts = ["Ann met Bob in Paris in 1999, and they moved to Rome (Italy) in 2003.",
                "The Eiffel Tower, completed in 1889, is 330 metres tall; it was the tallest structure "
                "in the world until 1930 -- when the Chrysler Building opened in New York.",
                "Caf\u00e9 owners said: \"We sell 40% more tea than coffee.\" That was in 2019."]
    examples = [{"id": str(i), "question": q, "context": c, "answers": []}
                for i, (q, c) in enumerate([("Where did they move?", contexts[0]), ("How tall is it?", contexts[1]),
                                            ("When was it completed?", contexts[1]), ("How much more?", contexts[2])])]
    preds, nbest = F.predict_qa(loaded, tok, examples, settings)
    qa = pipeline("question-answering", model=out, trust_remote_code=True)
    for e in examples:
        got = qa(question=e["question"], context=e["context"], top_k=3)
        want = nbest[e["id"]][:3]
        assert [(g["answer"], g["start"], g["end"]) for g in got] == [(w["text"], w["start"], w["end"]) for w in want]
        assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], rel=1e-4)
        assert got[0]["answer"] == preds[e["id"]] != ""
    batch = qa(question=[e["question"] for e in examples], context=[e["context"] for e in examples])
    assert [b["answer"] for b in batch] == [preds[e["id"]] for e in examples]
    # the model alone: same logits as the project's TaskModel
    hf = AutoModelForQuestionAnswering.from_pretrained(out, trust_remote_code=True).eval()
    rows = [tok.encode(c) for c in contexts]
    ids, mask, _ = F.collate(rows, side)
    with torch.no_grad():
        s, e = loaded(ids, mask)
        o = hf(input_ids=ids, attention_mask=mask.long())
    torch.testing.assert_close(o.start_logits[mask], s[mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o.end_logits[mask], e[mask], atol=1e-4, rtol=1e-4)


def test_commands_end_to_end(hf_qwen3_dir, tmp_path, shared_data, capsys):
    common = ["--init", hf_qwen3_dir, "--max_train", "24", "--max_eval", "24", "--max_steps", "2",
              "--batch_size", "8", "--log_interval", "1"]
    for task, metric in (("nli", "accuracy"), ("sts", "spearman")):
        out = tmp_path / task
        F.main([task, "--out", str(out), *common, "--attn", "causal", "--pooling", "last"] +
               (["--freeze_embed"] if task == "sts" else []))
        res = json.loads((out / "results.json").read_text())
        assert res["train"]["steps"] == 2 and res["val"]["pairs"] == 24 and metric in res["val"]
        from safetensors.torch import load_file
        sd = load_file(str(out / "model.safetensors"))
        start = F.load_encoder(hf_qwen3_dir)
        assert torch.equal(sd["encoder.embed.weight"], start.embed.weight) == (task == "sts")
        assert not torch.equal(sd["encoder.decoder.layers.0.mlp.up_proj.weight"],
                               start.decoder.layers[0].mlp.up_proj.weight)
    out = tmp_path / "qa"
    F.main(["qa", "--out", str(out), *common, "--max_len", "128", "--doc_stride", "32"])
    res = json.loads((out / "results.json").read_text())
    assert res["val"]["questions"] == 24 and 0 <= res["val"]["f1"] <= 100
    # predict on the exported directory gives the same validation predictions and scores
    val = {"version": "1.1", "data": [{"title": "v", "paragraphs": []}]}
    _, examples = F.load_squad(os.path.join(shared_data, "qa", "squad_train_subset_v1.1.json"))
    saved = json.loads((out / "val_predictions.json").read_text())
    for e in examples:
        if e["id"] in saved:
            val["data"][0]["paragraphs"].append({"context": e["context"], "qas": [
                {"id": e["id"], "question": e["question"],
                 "answers": [{"text": t, "answer_start": s} for t, s in e["answers"]]}]})
    (tmp_path / "val.json").write_text(json.dumps(val))
    capsys.readouterr()
    F.main(["predict", "--model", str(out), "--data", str(tmp_path / "val.json"), "--out", str(tmp_path / "pred.json")])
    assert json.loads((tmp_path / "pred.json").read_text()) == saved
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == pytest.approx(
        {k: res["val"][k] for k in ("exact_match", "f1")})
    with pytest.raises(SystemExit) as e:
        F.main(["nli", "--init", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "missing" in err and not (tmp_path / "x").exists()
    (tmp_path / "bad.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(SystemExit) as e:
        F.main(["sts", "--init", hf_qwen3_dir, "--out", str(tmp_path / "y"), "--train", str(tmp_path / "bad.tsv")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "bad.tsv" in err and "sentence1" in err and not (tmp_path / "y").exists()
