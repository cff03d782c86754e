"""contrastive.py: InfoNCE against a hand computation (in-batch and hard negatives, temperature), Matryoshka as
the weighted sum over prefixes, negatives gathered across 2 real processes == one process with the whole batch
(loss and gradients), the data readers, the starting points, and a tiny encoder that learns a synthetic
paraphrase task. Run as a script under torchrun it is the 2-process worker."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import contrastive as C  # noqa: E402
import model as M  # noqa: E402
from model_config import get_preset  # noqa: E402


# ---------------------------------------------------------------------------------------
# the loss, by hand

def hand_loss(q, pos, neg, tau):
    """Sum over queries of -log(exp(cos(q_i, p_i)/tau) / sum over every positive and hard negative c
    of exp(cos(q_i, c)/tau)), in float64 with plain Python loops."""
    q, pos = q.double().tolist(), pos.double().tolist()
    neg = [] if neg is None else neg.double().tolist()

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    total = 0.0
    for i, qi in enumerate(q):
        scores = [cos(qi, c) / tau for c in pos + neg]
        total += -scores[i] + math.log(sum(math.exp(s) for s in scores))
    return total


def test_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    q, p, n = (torch.randn(5, 6, generator=g) for _ in range(3))
    for tau in (0.05, 0.1, 1.0):
        for neg in (None, n):
            got = C.contrastive_loss(q, p, neg, scale=1 / tau)
            assert got.item() == pytest.approx(hand_loss(q, p, neg, tau), rel=1e-5), (tau, neg is None)
    # hard negatives make the task harder: a negative identical to the positive costs log 2 more at least
    assert C.contrastive_loss(q, p, p.clone(), 20.0) > C.contrastive_loss(q, p, None, 20.0) + math.log(2) * 5 * 0.99


def test_matryoshka_is_weighted_sum_over_prefixes():
    g = torch.Generator().manual_seed(1)
    q, p, n = (torch.randn(4, 8, generator=g) for _ in range(3))
    dims, weights = [8, 4, 2], [1.0, 0.5, 0.25]
    got = C.contrastive_loss(q, p, n, scale=20.0, dims=dims, weights=weights).item()
    want = sum(w * hand_loss(q[:, :d], p[:, :d], n[:, :d], 0.05) for d, w in zip(dims, weights))
    assert got == pytest.approx(want, rel=1e-5)
    # and a prefix is not the full vector: each term differs
    assert hand_loss(q[:, :2], p[:, :2], n[:, :2], 0.05) != pytest.approx(hand_loss(q, p, n, 0.05), rel=1e-3)


def test_learnable_scale_gets_the_hand_gradient():
    g = torch.Generator().manual_seed(2)
    q, p = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    log_scale = torch.tensor(math.log(20.0), requires_grad=True)
    C.contrastive_loss(q, p, None, scale=log_scale.exp()).backward()
    eps = 1e-4  # central difference of the hand computation in log(scale)
    fd = (hand_loss(q, p, None, 1 / math.exp(math.log(20) + eps)) - hand_loss(q, p, None, 1 / math.exp(math.log(20) - eps))) / (2 * eps)
    assert log_scale.grad.item() == pytest.approx(fd, rel=1e-3)


def test_learned_temperature_that_no_optimiser_steps_is_reported(tmp_path, capsys):
    obj = C.Objective(config(write(tmp_path / "nli.tsv", NLI), contrastive_learn_temperature=True), tiny_qwen3().cfg)
    assert obj.parameters() == [("contrastive.log_scale", obj.log_scale)]
    model = tiny_qwen3()
    b = {k: torch.from_numpy(v) for k, v in obj.train_batch(0, 0, 2).items()}
    for _ in range(20):
        obj.loss(model, b)[0].backward()
    assert "is Objective.parameters() in the optimiser?" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# data

def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


NLI = ("premise\thypothesis\tlabel\n"
       'A "quoted" man sleeps.\tA man rests.\tentailment\n'
       'A "quoted" man sleeps.\tA man runs.\tcontradiction\n'
       'A "quoted" man sleeps.\tA man dreams.\tneutral\n'
       "Two dogs play.\tDogs are playing.\tentailment\n"
       "Two dogs play.\tAnimals have fun.\tentailment\n"
       "Two dogs play.\tThe dogs sleep.\tcontradiction\n"
       "A kid eats.\tSomeone eats.\tentailment\n")


def test_nli_reader_groups_premises(tmp_path):
    f = write(tmp_path / "nli.tsv", NLI)
    ex = C.read_examples(f, hard_negatives=True)
    # the kid has no contradiction: no triplet; bare quotes stay text (QUOTE_NONE)
    assert ex == [(['A "quoted" man sleeps.'], ["A man rests."], ["A man runs."]),
                  (["Two dogs play."], ["Dogs are playing.", "Animals have fun."], ["The dogs sleep."])]
    pairs = C.read_examples(f, hard_negatives=False)
    assert [e[0][0] for e in pairs] == ['A "quoted" man sleeps.', "Two dogs play.", "A kid eats."]
    assert all(len(e) == 2 for e in pairs)


def test_other_formats_and_bad_input(tmp_path):
    f = write(tmp_path / "pairs.tsv", "anchor\tpositive\tnegative\nq1\td1\tn1\nq2\td2\tn2\n")
    assert C.read_examples(f) == [(["q1"], ["d1"], ["n1"]), (["q2"], ["d2"], ["n2"])]
    assert C.read_examples(f, hard_negatives=False) == [(["q1"], ["d1"]), (["q2"], ["d2"])]
    f = write(tmp_path / "sents.txt", "First sentence.\n\n  Second one.  \n")
    assert C.read_examples(f) == [(["First sentence."], ["First sentence."]), (["Second one."], ["Second one."])]
    with pytest.raises(ValueError, match="no such file"):
        C.read_examples(str(tmp_path / "missing.tsv"))
    with pytest.raises(ValueError, match="no usable examples"):
        C.read_examples(write(tmp_path / "n.tsv", "premise\thypothesis\tlabel\na\tb\tneutral\n"))
    with pytest.raises(ValueError, match=r"n2\.tsv:3"):
        C.read_examples(write(tmp_path / "n2.tsv", "premise\thypothesis\tlabel\na\tb\tentailment\nbad row\n"))


def config(data, **kw):
    c = {k: v for k, v in C.CONFIG.items()}
    c.update(contrastive_data=data, seed=3, contrastive_attn_dropout=0.0, contrastive_hidden_dropout=0.0)
    c.update(kw)
    return SimpleNamespace(**c)


def test_batches_are_a_function_of_the_rows(tmp_path):
    f = write(tmp_path / "nli.tsv", NLI)
    obj = C.Objective(config(f, contrastive_query_prefix="query: ", contrastive_doc_prefix="doc: "), get_preset("tiny"))
    whole = obj.train_batch(0, 0, 6)
    a, b = obj.train_batch(0, 0, 2), obj.train_batch(0, 2, 4)
    assert whole["ids"].shape[:2] == (6, 3) and whole["mask"].dtype == bool
    for part, rows in ((a, range(0, 2)), (b, range(2, 6))):
        for r, i in enumerate(rows):
            for s in range(3):
                n = part["mask"][r, s].sum()
                assert whole["mask"][i, s].sum() == n
                assert (whole["ids"][i, s, :n] == part["ids"][r, s, :n]).all()
    # epoch of 2 premises: rows 0,1 are both premises once; prefixes are text before the text
    t = obj.tokenizer
    firsts = {t.decode(whole["ids"][i, 0, :whole["mask"][i, 0].sum()].tolist()) for i in range(2)}
    assert firsts == {'query: A "quoted" man sleeps.', "query: Two dogs play."}
    assert t.decode(whole["ids"][0, 1, :whole["mask"][0, 1].sum()].tolist()).startswith("doc: ")
    assert obj.eval_batch(0, 3) is None
    # each epoch draws again which entailment is the positive: both of the dogs' show up over epochs
    seen = {tuple(obj.train.get(k)[1:]) for k in range(40) if obj.train.get(k)[0] == "Two dogs play."}
    assert {p for p, _ in seen} == {"Dogs are playing.", "Animals have fun."} and {n for _, n in seen} == {"The dogs sleep."}
    assert set(obj.extra_ids) >= set(t.encode("query: Two dogs play.")) and t.pad_id in obj.extra_ids


def test_config_errors_name_the_key(tmp_path):
    f = write(tmp_path / "nli.tsv", NLI)
    for kw, key in ((dict(contrastive_pooling="max"), "contrastive_pooling"),
                    (dict(contrastive_matryoshka_dims=[128]), "contrastive_matryoshka_dims"),
                    (dict(contrastive_matryoshka_dims=[64, 32], contrastive_matryoshka_weights=[1.0]),
                     "contrastive_matryoshka_weights"),
                    (dict(contrastive_temperature=0.0), "contrastive_temperature"),
                    (dict(contrastive_data=""), "contrastive_data"),
                    (dict(contrastive_val_data=write(tmp_path / "s.txt", "a\n")), "contrastive_val_data")):
        with pytest.raises(ValueError, match=key):
            C.Objective(config(f, **kw), get_preset("tiny"))
    with pytest.raises(ValueError, match="decoder-only"):
        C.Objective(config(f), get_preset("tiny_encdec"))


# ---------------------------------------------------------------------------------------
# starting points: every one is a Qwen3 whose bidirectional states are the encoder's

def random_encdec(seed=0):
    torch.manual_seed(seed)
    m = M.EncoderDecoder(get_preset("tiny_encdec"))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return m.eval()


def test_starting_points(tmp_path, hf_qwen3_dir):
    ids = torch.tensor([[9707, 1879, 11, 1879, 0], [9707, 1879, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    ed = random_encdec()
    ed.save_pretrained(str(tmp_path / "run" / "ckpt-0000010"))
    with torch.no_grad():
        want = ed.encode(ids, mask)
    for path in (str(tmp_path / "run" / "ckpt-0000010"), str(tmp_path / "run")):  # a checkpoint, an out_dir
        m = C.load_start(path).eval()
        assert isinstance(m, M.Qwen3) and m.cfg.num_encoder_layers == 0
        with torch.no_grad():
            got = m.hidden(ids, mask, attn="bidirectional")
        torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=0)
    # an extracted encoder directory: tests/test_extract.py (it has one already)
    # a Hugging Face Qwen3: its own weights, read without the causal mask
    q = C.load_start(hf_qwen3_dir).eval()
    ref = M.Qwen3.from_pretrained(hf_qwen3_dir).eval()
    for (k, v), (k2, v2) in zip(q.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with torch.no_grad():
        bi, causal = q.hidden(ids, mask, attn="bidirectional"), ref.hidden(ids, mask)
    assert (bi[0, 0] - causal[0, 0]).abs().max() > 1e-3  # the first token now sees the ones after it
    with pytest.raises(ValueError, match="model_type"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "bert"}))
        C.load_start(str(tmp_path / "bad"))


def test_mode_token_auto_follows_the_starting_point(tmp_path, hf_qwen3_dir):
    """contrastive_mode_token='auto' is an extracted encoder's default prompt, '' from a UL2 checkpoint, Qwen3 or
    scratch, and on resume what the checkpoint recorded; a given token (<|ul2_S|>: every text, query and
    document, starts with id 151671) is kept; the resolved text is written back to the config train.py saves."""
    import tokenizer as tok
    f = write(tmp_path / "nli.tsv", NLI)
    random_encdec().save_pretrained(str(tmp_path / "ul2" / "ckpt-0000010"))
    enc = tmp_path / "enc"
    enc.mkdir()
    (enc / "config.json").write_text(json.dumps({"model_type": "qwen3_encoder", "prompts": {"default": "<|ul2_R|>"}}))
    (tmp_path / "run").mkdir()
    cases = [(dict(init_from="pretrained", init_path=str(tmp_path / "ul2")), ""),
             (dict(init_from="pretrained", init_path=str(enc)), "<|ul2_R|>"),
             (dict(init_from="qwen3", qwen3_path=hf_qwen3_dir), ""),
             (dict(init_from="scratch"), ""),
             (dict(init_from="pretrained", init_path=str(tmp_path / "ul2"), contrastive_mode_token="<|ul2_S|>"),
              "<|ul2_S|>"),
             (dict(init_from="pretrained", init_path=str(enc), contrastive_mode_token=""), ""),
             (dict(init_from="scratch", contrastive_mode_token="<|ul2_X|>"), "<|ul2_X|>")]
    for kw, want in cases:
        c = config(f, **kw, contrastive_query_prefix="q: ", out_dir=str(tmp_path / "run"))
        assert C.resolve_mode_token(c) == want, kw
        obj = C.Objective(c, get_preset("tiny"))
        assert c.contrastive_mode_token == want  # what trainer_state.json records
        b = obj.train_batch(0, 0, 2)
        want_ids = tok.load_tokenizer().encode(want + "q: Two dogs play.")
        firsts = [b["ids"][i, 0, :b["mask"][i, 0].sum()].tolist() for i in range(2)]
        assert want_ids in firsts
        if want == "<|ul2_S|>":
            assert (b["ids"][:, :, 0] == tok.MODE_IDS["S"]).all() and want_ids[:3] == [tok.MODE_IDS["S"], 80, 25]
            assert tok.MODE_IDS["S"] in obj.extra_ids  # trim_vocab keeps its row
    # resume: what the newest checkpoint's trainer_state.json says, whatever the starting point
    ckpt = tmp_path / "run" / "ckpt-0000004"
    tiny_qwen3().save_pretrained(str(ckpt))
    (ckpt / "trainer_state.json").write_text(json.dumps({"iter": 4, "config": {"contrastive_mode_token": "<|ul2_S|>"}}))
    from safetensors.torch import save_file
    save_file({"rng.torch.0": torch.get_rng_state()}, str(ckpt / "trainer_state.safetensors"))
    assert C.resolve_mode_token(config(f, init_from="resume", out_dir=str(tmp_path / "run"))) == "<|ul2_S|>"
    (ckpt / "trainer_state.json").write_text(json.dumps({"iter": 4, "config": {}}))  # a run from before the key
    assert C.resolve_mode_token(config(f, init_from="resume", out_dir=str(tmp_path / "run"))) == ""


# ---------------------------------------------------------------------------------------
# gather across 2 processes == one process with the whole batch

def tiny_qwen3(seed=0):
    torch.manual_seed(seed)
    return M.Qwen3(get_preset("tiny", hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                              num_kv_heads=1, head_dim=16))


class TinyEmbedder(torch.nn.Module):
    """An embedding bag + linear layer: forward -> pooled embeddings, so DDP sees one forward per step."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.EmbeddingBag(200, 16, mode="mean")
        self.proj = torch.nn.Linear(16, 8)

    def forward(self, ids):
        return self.proj(self.emb(ids))


def gather_worker(out_path, data):
    """torchrun worker: rank r holds rows r*B .. r*B+B-1 of the global batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    B = 4
    result = {}
    # 1. the real objective on a tiny Qwen3: learned temperature, hard negatives, Matryoshka, gather
    c = config(data, contrastive_learn_temperature=True, contrastive_matryoshka_dims=[32, 16, 8],
               contrastive_matryoshka_weights=[1.0, 0.5, 0.25])
    obj = C.Objective(c, tiny_qwen3().cfg, rank, world)
    model = tiny_qwen3()
    full = obj.train_batch(0, 0, B * world)
    mine = obj.train_batch(0, rank * B, B)
    loss, n = obj.loss(model, {k: torch.from_numpy(v) for k, v in mine.items()})
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)  # the global gradient is the sum over processes
    scale_grad = obj.log_scale.grad.clone() * world  # the hook averaged it over processes, as DDP does
    if rank == 0:
        # one process with the whole batch (gather off: this process is still part of the group)
        ref_obj = C.Objective(SimpleNamespace(**{**vars(c), "contrastive_gather": False}), tiny_qwen3().cfg)
        ref = tiny_qwen3()
        ref_loss, ref_n = ref_obj.loss(ref, {k: torch.from_numpy(v) for k, v in full.items()})
        ref_loss.backward()
        result["loss"] = [total.item(), ref_loss.item()]
        result["grad_diff"] = max((grads[k] - p.grad).abs().max().item() for k, p in ref.named_parameters())
        result["grad_max"] = max(p.grad.abs().max().item() for p in ref.parameters())
        result["scale_grad"] = [scale_grad.item(), ref_obj.log_scale.grad.item()]
        result["rows"] = [n * world, ref_n]
    # 2. train.py's scaling under DDP: (loss_sum * world / global rows).backward(), DDP averages
    torch.manual_seed(0)
    emb = TinyEmbedder()
    ids = torch.randint(0, 200, (3 * B * world, 5), generator=torch.Generator().manual_seed(1))
    ddp = DistributedDataParallel(emb)
    mine = ids.view(world, 3 * B, 5)[rank]
    e = ddp(mine).view(3, B, -1)
    loss = C.contrastive_loss(e[0], e[1], e[2], 20.0, gather=True)
    (loss * world / (B * world)).backward()
    if rank == 0:
        torch.manual_seed(0)
        ref = TinyEmbedder()
        e = ref(ids.view(world, 3, B, 5).transpose(0, 1).reshape(3 * B * world, 5)).view(3, B * world, -1)
        (C.contrastive_loss(e[0], e[1], e[2], 20.0) / (B * world)).backward()
        result["ddp_grad_diff"] = max((p.grad - q.grad).abs().max().item()
                                      for p, q in zip(emb.parameters(), ref.parameters()))
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def test_gather_across_two_processes_equals_one_process(tmp_path):
    data = write(tmp_path / "nli.tsv", NLI + "".join(
        f"Premise number {i} is here.\tStatement {i} holds.\tentailment\n"
        f"Premise number {i} is here.\tStatement {i} fails.\tcontradiction\n" for i in range(10)))
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.abspath(__file__), str(out), data]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["rows"] == [8, 8]
    # the loss per query (what train.py logs) to 1e-5; the sums differ only in fp32 summation order
    assert r["loss"][0] / 8 == pytest.approx(r["loss"][1] / 8, abs=1e-5)
    # fp32 sums of the same terms in another order: equal to 1e-5 of the gradient's scale (here ~100s)
    assert r["grad_diff"] <= 1e-5 * r["grad_max"] and r["grad_max"] > 1e-3
    assert r["scale_grad"][0] / 8 == pytest.approx(r["scale_grad"][1] / 8, abs=1e-5)  # per query, as train.py
    assert r["ddp_grad_diff"] <= 1e-5


# ---------------------------------------------------------------------------------------
# a tiny encoder learns a synthetic paraphrase task

CONCEPTS = [("cat", "feline"), ("dog", "hound"), ("car", "automobile"), ("house", "home"), ("big", "large"),
            ("small", "little"), ("quick", "fast"), ("happy", "glad"), ("road", "street"), ("child", "kid"),
            ("begin", "start"), ("end", "finish"), ("buy", "purchase"), ("rock", "stone"), ("sea", "ocean"),
            ("shout", "yell")]


def sentence(concepts, side):
    return " ".join(CONCEPTS[c][side] for c in concepts)


def paraphrase_data(rng, n):
    """anchor: 3 concepts in their first word; positive: the same concepts in their synonyms; hard negative:
    2 of the anchor's own words and a different concept (the words a bag-of-tokens model would match)."""
    rows = []
    for _ in range(n):
        cs = rng.choice(len(CONCEPTS), 3, replace=False)
        other = rng.choice([c for c in range(len(CONCEPTS)) if c not in cs])
        neg = list(cs[:2]) + [other]
        rows.append((sentence(cs, 0), sentence(cs, 1), sentence(neg, 0)))
    return rows


def test_tiny_encoder_learns_paraphrases(tmp_path):
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    train, test = paraphrase_data(rng, 400), paraphrase_data(rng, 64)
    f = write(tmp_path / "para.tsv", "anchor\tpositive\tnegative\n" + "".join("\t".join(r) + "\n" for r in train))
    obj = C.Objective(config(f, contrastive_max_len=16), get_preset("tiny"))
    torch.manual_seed(0)
    model = M.Qwen3(get_preset("tiny", hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                               num_kv_heads=1, head_dim=16))

    def accuracy():
        """Share of held-out anchors whose paraphrase beats their hard negative and every other paraphrase."""
        model.eval()
        with torch.no_grad():
            b = obj.pack([list(r) for r in test])
            e = F.normalize(obj.embed(model, torch.from_numpy(b["ids"]), torch.from_numpy(b["mask"])), dim=-1)
        model.train()
        pos = e[:, 0] @ e[:, 1].T  # [i, j] = cos(anchor_i, paraphrase_j)
        hard = (e[:, 0] * e[:, 2]).sum(-1)
        best_other = pos.masked_fill(torch.eye(len(test), dtype=torch.bool), -2).max(1).values
        return ((pos.diag() > hard) & (pos.diag() > best_other)).float().mean().item()

    before = accuracy()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(60):
        b = obj.train_batch(step, step * 32, 32)
        loss, n = obj.loss(model, {k: torch.from_numpy(v) for k, v in b.items()})
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    after = accuracy()
    print(f"paraphrase ranking accuracy: {before:.2f} before, {after:.2f} after")
    assert before < 0.3 and after >= 0.9


# ---------------------------------------------------------------------------------------
# train.py runs the objective; extract.py ships what it trained

@pytest.mark.slow
def test_train_py_trains_it_and_extract_ships_it(tmp_path, hf_qwen3_dir):
    import eval_embed
    import extract
    import train
    data = write(tmp_path / "nli.tsv", NLI + "".join(
        f"Premise number {i} is here.\tStatement {i} holds.\tentailment\n"
        f"Premise number {i} is here.\tStatement {i} fails.\tcontradiction\n" for i in range(10)))
    out = tmp_path / "run"
    train.main(["--objective=contrastive", "--init_from=qwen3", f"--qwen3_path={hf_qwen3_dir}", f"--out_dir={out}",
                f"--contrastive_data={data}", f"--contrastive_val_data={data}", "--contrastive_pooling=last",
                "--contrastive_matryoshka_dims=[64, 16]", "--contrastive_query_prefix=query: ", "--max_iters=4",
                "--batch_size=4", "--eval_interval=2", "--eval_iters=2", "--log_interval=1", "--warmup_iters=1",
                "--device=cpu", "--learning_rate=1e-3"])
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert [r["val_loss"] for r in log if "val_loss" in r][-1] < [r["val_loss"] for r in log if "val_loss" in r][0]
    enc = str(tmp_path / "enc")
    extract.main(["--ckpt", str(out), "--out", enc, "--verify"])  # the three loaders, also @16 and with the prompt
    cfg = json.load(open(os.path.join(enc, "config.json")))
    assert cfg["pooling"] == "last" and cfg["matryoshka_dims"] == [16] and cfg["prompts"] == {"query": "query: "}
    ckpt = extract.resolve_checkpoints(str(out))[0]
    np.testing.assert_allclose(eval_embed.load_model(ckpt).encode(["A man rests."]),
                               eval_embed.load_model(enc).encode(["A man rests."]), atol=1e-5)


@pytest.mark.slow
def test_train_py_two_processes_equal_one_with_the_whole_batch(tmp_path, hf_qwen3_dir):
    """torchrun, 2 processes x 4 rows (negatives gathered) == 1 process x 8 rows: same losses, same weights."""
    data = write(tmp_path / "nli.tsv", NLI + "".join(
        f"Premise number {i} is here.\tStatement {i} holds.\tentailment\n"
        f"Premise number {i} is here.\tStatement {i} fails.\tcontradiction\n" for i in range(10)))
    common = ["--objective=contrastive", "--init_from=qwen3", f"--qwen3_path={hf_qwen3_dir}",
              f"--contrastive_data={data}", "--contrastive_attn_dropout=0.0", "--contrastive_hidden_dropout=0.0",
              "--contrastive_matryoshka_dims=[64, 32]", "--max_iters=3", "--eval_interval=0", "--log_interval=1",
              "--warmup_iters=1", "--device=cpu", "--learning_rate=1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, launch, extra in (("one", [], ["--batch_size=8"]),
                                ("ddp", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                                 ["--batch_size=4", "--grad_accum=2"]),
                                ("fsdp", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                                 ["--batch_size=4", "--grad_accum=2", "--parallelism=fsdp"])):
        out = tmp_path / name
        p = subprocess.run([sys.executable, *launch, os.path.join(ROOT, "train.py"), *common, *extra,
                            f"--out_dir={out}"], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert p.returncode == 0, name + p.stdout[-2000:] + p.stderr[-2000:]
        log = [json.loads(line) for line in open(out / "log.jsonl")]
        runs[name] = ([r["loss"] for r in log if "loss" in r], M.read_safetensors_dir(str(out / "ckpt-0000003")))
    losses, weights = runs["one"]
    assert len(losses) == 3
    for name in ("ddp", "fsdp"):
        np.testing.assert_allclose(runs[name][0], losses, atol=1e-5, err_msg=name)
        assert max((runs[name][1][k] - v).abs().max().item() for k, v in weights.items()) <= 1e-5, name


@pytest.mark.slow
def test_train_py_from_a_ul2_run_learned_temperature_trimmed_resumes_exactly(tmp_path):
    """init_from='pretrained' (a UL2 out_dir), a learned temperature, trim_vocab, the <|ul2_S|> mode token:
    4 iterations straight == 2, then resume to 4 without naming the token ('auto' keeps the recorded one);
    weights and temperature equal; the temperature moved; extract ships it with the token as default prompt."""
    import train
    ed = random_encdec()
    ed.save_pretrained(str(tmp_path / "ul2" / "ckpt-0000010"))
    data = write(tmp_path / "nli.tsv", NLI + "".join(
        f"Premise number {i} is here.\tStatement {i} holds.\tentailment\n"
        f"Premise number {i} is here.\tStatement {i} fails.\tcontradiction\n" for i in range(10)))
    common = ["--objective=contrastive", "--init_from=pretrained", f"--init_path={tmp_path / 'ul2'}",
              f"--contrastive_data={data}", "--contrastive_learn_temperature=True", "--trim_vocab=True",
              "--contrastive_attn_dropout=0.1", "--contrastive_hidden_dropout=0.1", "--batch_size=4",
              "--eval_interval=0", "--log_interval=1", "--warmup_iters=1", "--device=cpu", "--learning_rate=3e-3",
              "--lr_decay_iters=4", "--ckpt_interval=2"]
    mode = "--contrastive_mode_token=<|ul2_S|>"
    train.main([*common, mode, "--max_iters=4", f"--out_dir={tmp_path / 'straight'}"])
    train.main([*common, mode, "--max_iters=2", f"--out_dir={tmp_path / 'split'}"])
    train.main([*common[:1], "--init_from=resume", *common[3:], "--max_iters=4", f"--out_dir={tmp_path / 'split'}"])
    a, b = (M.read_safetensors_dir(str(tmp_path / r / "ckpt-0000004")) for r in ("straight", "split"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (json.loads((tmp_path / r / "ckpt-0000004" / "trainer_state.json").read_text())["objective_params"]
              for r in ("straight", "split"))
    assert sa == sb and sa["contrastive.log_scale"] != pytest.approx(math.log(20), abs=1e-6)
    # the mode token is kept on resume (the weights above match only if the resumed half read the same texts)
    # and shipped as the encoder's default prompt
    for r in ("straight", "split"):
        state = json.loads((tmp_path / r / "ckpt-0000004" / "trainer_state.json").read_text())
        assert state["config"]["contrastive_mode_token"] == "<|ul2_S|>"
    import extract
    extract.main(["--ckpt", str(tmp_path / "split"), "--out", str(tmp_path / "enc")])
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["prompts"] == {"default": "<|ul2_S|>"}
    # the trained model is the UL2 encoder moved on: same shapes, changed weights
    assert a["model.embed_tokens.weight"].shape == ed.embed.weight.shape
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], ed.encoder.layers[0].attn.q_proj.weight)


if __name__ == "__main__":
    gather_worker(sys.argv[1], sys.argv[2])
