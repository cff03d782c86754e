"""diffusion.py: the sampler against a step-by-step reference of LLaDA's algorithm, the losses against hand
computations, the forward process's statistics, SFT rows and records, block attention, the prefix cache, and
a tiny bidirectional Qwen3 trained here that unmasks a deterministic corpus and regenerates it."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffusion as D
from model import Qwen3
from model_config import ModelConfig
from tokenizer import EOS_ID, IGNORE_INDEX


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------
# a toy logits function and a step-by-step reference of the algorithm

V, MASK = 40, 39


class Toy:
    """Logits that depend on every token of the row (so each commit changes later predictions) and on the
    attention mask (padding is ignored): logits[t] = W (sum_s c[t-s] E[x_s] over real s) + U E[x_t]."""

    def __init__(self, seed=0, d=16):
        g = torch.Generator().manual_seed(seed)
        self.E = torch.randn(V, d, generator=g)
        self.W = torch.randn(V, d, generator=g)
        self.U = torch.randn(V, d, generator=g) * 0.5
        self.c = torch.randn(64, generator=g) * 0.3
        self.calls = []

    def __call__(self, ids, attention_mask=None):
        self.calls.append(ids.clone())
        B, T = ids.shape
        e = self.E[ids]
        dist = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).abs()
        mix = self.c[dist][None].expand(B, T, T).clone()
        if attention_mask is not None:
            if attention_mask.dim() == 2:
                mix = mix * attention_mask.float()[:, None, :]
            else:  # a [B, T, T] structure
                mix = mix * attention_mask.float()
        logits = (mix @ e) @ self.W.T + e @ self.U.T
        logits[..., MASK] = -30.0  # a trained model never predicts the mask token (it is never a label)
        return logits


def reference(f, prompt, steps, gen_length, block_length, cfg_scale=0.0, attention_mask=None):
    """LLaDA's algorithm written out plainly: logits over the whole sequence, the highest probabilities of the
    argmax tokens among the current block's masked positions, a Python sort."""
    B, P = prompt.shape
    x = prompt.tolist()
    x = [row + [MASK] * gen_length for row in x]
    am = None
    if attention_mask is not None:
        am = torch.cat([attention_mask, torch.ones(B, gen_length, dtype=attention_mask.dtype)], 1)
    blocks = gen_length // block_length
    per = steps // blocks
    committed = []
    for nb in range(blocks):
        lo, hi = P + nb * block_length, P + (nb + 1) * block_length
        n = [sum(1 for t in range(lo, hi) if x[b][t] == MASK) for b in range(B)]
        sched = [[n[b] // per + (1 if i < n[b] % per else 0) for i in range(per)] for b in range(B)]
        for i in range(per):
            xt = torch.tensor(x)
            logits = f(xt, am)
            if cfg_scale > 0:
                un = xt.clone()
                un[:, :P] = torch.where(xt[:, :P] != MASK, MASK, xt[:, :P])
                ul = f(un, am)
                logits = ul + (cfg_scale + 1) * (logits - ul)
            p = torch.softmax(logits, -1)
            for b in range(B):
                cand = []
                for t in range(lo, hi):
                    if x[b][t] == MASK:
                        tok = int(logits[b, t].argmax())
                        cand.append((float(p[b, t, tok]), t, tok))
                cand.sort(key=lambda c: -c[0])
                for _, t, tok in cand[:sched[b][i]]:
                    x[b][t] = tok
                committed.append(sched[b][i])
    return torch.tensor(x)


@pytest.mark.parametrize("steps,gen,block,cfg", [(8, 8, 8, 0.0), (5, 12, 12, 0.0), (8, 16, 4, 0.0),
                                                 (6, 12, 4, 1.5), (9, 9, 9, 0.5)])
def test_generate_equals_step_by_step_reference(steps, gen, block, cfg):
    f = Toy()
    prompt = torch.randint(0, MASK, (3, 5), generator=torch.Generator().manual_seed(1))
    got = D.generate(f, prompt, steps=steps, gen_length=gen, block_length=block, cfg_scale=cfg, mask_id=MASK)
    want = reference(Toy(), prompt, steps, gen, block, cfg)
    assert torch.equal(got, want)
    assert torch.equal(got[:, :5], prompt)
    assert not bool((got == MASK).any())


def test_each_step_commits_exactly_the_scheduled_count_and_keeps_the_prompt():
    f = Toy(seed=3)
    prompt = torch.randint(0, MASK, (2, 4), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    steps, gen, block = 6, 14, 7  # 7 masks over 3 steps: 3, 2, 2
    out = D.generate(f, prompt, attention_mask, steps=steps, gen_length=gen, block_length=block, mask_id=MASK)
    masks = [int((c[0] == MASK).sum()) for c in f.calls] + [0]
    assert [a - b for a, b in zip(masks, masks[1:])] == [3, 2, 2, 3, 2, 2]
    for c in f.calls:
        assert torch.equal(c[:, :4], prompt)  # the prompt is never changed
    want = reference(Toy(seed=3), prompt, steps, gen, block, attention_mask=attention_mask)
    assert torch.equal(out, want)
    assert torch.equal(D.num_transfer_tokens(torch.ones(1, 10, dtype=torch.bool), 4), torch.tensor([[3, 3, 2, 2]]))


def test_padding_is_ignored_by_a_model_that_ignores_it():
    f = Toy(seed=4)
    prompt = torch.randint(0, MASK, (1, 5), generator=torch.Generator().manual_seed(5))
    alone = D.generate(f, prompt, steps=4, gen_length=8, block_length=4, mask_id=MASK)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], 1)
    am = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)], 1)
    out = D.generate(f, padded, am, steps=4, gen_length=8, block_length=4, mask_id=MASK)
    assert torch.equal(out[:, 3:], alone)


def test_sampling_options():
    f = Toy(seed=6)
    prompt = torch.randint(0, MASK, (2, 4), generator=torch.Generator().manual_seed(7))
    kw = dict(steps=8, gen_length=8, block_length=8, mask_id=MASK)
    # forbidding EOS: the toy's favourite token becomes "EOS" and never appears
    greedy = D.generate(f, prompt, **kw)
    fav = int(torch.mode(greedy[:, 4:].flatten()).values)
    no_fav = D.generate(f, prompt, logits_eos_inf=True, eos_id=fav, eot_id=fav, **kw)
    assert not bool((no_fav[:, 4:] == fav).any())
    # EOS/EoT committed last: a row's last committed positions hold them
    late = D.generate(Toy(seed=6), prompt, confidence_eos_eot_inf=True, eos_id=fav, eot_id=fav, **kw)
    # random remasking and temperature: reproducible with a generator, different across seeds, always complete
    runs = [D.generate(f, prompt, temperature=1.0, remasking=r, generator=torch.Generator().manual_seed(s), **kw)
            for r in ("random", "random_topk", "low_confidence") for s in (0, 0, 1)]
    for a, b, c in zip(runs[::3], runs[1::3], runs[2::3]):
        assert torch.equal(a, b) and not torch.equal(a, c) and not bool((a == MASK).any())
    assert not bool((late == MASK).any())
    with pytest.raises(ValueError, match="multiple of block_length"):
        D.generate(f, prompt, steps=4, gen_length=10, block_length=4, mask_id=MASK)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        D.generate(f, prompt, steps=3, gen_length=8, block_length=4, mask_id=MASK)


def test_confidence_eos_eot_commits_them_last():
    """EOS (7) is the most confident prediction at even positions; token 8 wins less confidently at odd ones.
    One commit per step: plain decoding fills the even (EOS) positions first, confidence_eos_eot_inf the odd."""
    T = 6

    def f(ids, am=None):
        logits = torch.zeros(ids.shape[0], ids.shape[1], V)
        logits[:, 0::2, 7] = 6.0
        logits[:, 1::2, 8] = 5.0
        logits[:, 1::2, 7] = 4.0
        return logits

    prompt = torch.full((1, 2), 3)
    for flag, first in ((False, [0, 2, 4]), (True, [1, 3, 5])):
        calls = []

        def g(ids, am=None):
            calls.append(ids.clone())
            return f(ids, am)

        x = D.generate(g, prompt, steps=T, gen_length=T, block_length=T, mask_id=MASK, confidence_eos_eot_inf=flag,
                       eos_id=7, eot_id=30)
        assert x[0, 2:].tolist() == [7, 8, 7, 8, 7, 8]
        assert (calls[3][0, 2:] != MASK).nonzero().flatten().tolist() == first


def test_gumbel_argmax_samples_the_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]]).expand(40000, 4)
    g = torch.Generator().manual_seed(0)
    for temp in (1.0, 0.5):
        draws = D.gumbel_argmax(logits, temp, g)
        freq = torch.bincount(draws, minlength=4).double() / len(draws)
        want = torch.softmax(logits[0].double() / temp, -1)
        assert (freq - want).abs().max() < 0.01


# ---------------------------------------------------------------------------------------
# forward process and losses

def test_forward_process_masks_with_p_mask():
    rng = np.random.default_rng(0)
    ids = np.arange(64)[None].repeat(20000, 0)
    noisy, noised, p = D.noise_rows(ids, rng, mask_id=MASK)
    assert p.min() >= D.EPS and p.max() <= 1.0
    frac = noised.mean(1)
    assert abs(frac.mean() - p.mean()) < 0.003 and abs(p.mean() - ((1 - D.EPS) / 2 + D.EPS)) < 0.005
    for lo in (0.0, 0.25, 0.5, 0.75):  # per p bin the masked fraction is p
        sel = (p >= lo) & (p < lo + 0.25)
        assert abs(frac[sel].mean() - p[sel].mean()) < 0.005
    assert (noisy[noised] == MASK).all() and (noisy[~noised] == ids[~noised]).all()
    # schedules: the mean of rate(t) for t ~ U(0, 1), by hand
    for sched, mean_rate in (("cosine", 1 - 2 / math.pi), ("power", 1 / 3), ("sigmoid", 0.5), ("uniform", 0.5)):
        _, noised, p = D.noise_rows(ids[:10000], np.random.default_rng(1), schedule=sched, mask_id=MASK)
        assert abs(p.mean() - ((1 - D.EPS) * mean_rate + D.EPS)) < 0.01, sched
        assert abs(noised.mean() - p.mean()) < 0.005
    assert D.mask_rate(0.0, "sigmoid") == pytest.approx(0) and D.mask_rate(1.0, "sigmoid") == pytest.approx(1)
    # min rate and dLLM's t range
    _, _, p = D.noise_rows(ids[:5000], rng, min_rate=0.3, t_low=0.1, t_high=0.6, mask_id=MASK)
    assert p.min() >= 0.3 and p.max() <= (1 - D.EPS) * 0.6 + D.EPS + 1e-12


def test_contiguous_spans_random_replace_and_shortening():
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 30, size=(2000, 50))
    noisy, noised, p = D.noise_rows(ids, rng, contiguous_prob=1.0, mask_id=MASK)
    for row, pr in zip(noised, p):
        where = np.flatnonzero(row)
        assert len(where) == max(1, int(round(pr * 50))) and (np.diff(where) == 1).all()
    noisy, noised, _ = D.noise_rows(ids, rng, noise_type="random_replace", mask_id=MASK)
    assert not (noisy == MASK).any() and set(np.unique(noisy[noised])) <= set(np.unique(ids))
    assert (noisy[noised] != ids[noised]).mean() > 0.9  # mostly another token
    # LLaDA's 1 %: rows cut to a length uniform in [1, L]
    attn = np.ones((100000, 20), bool)
    lengths = D.shorten_rows(attn, np.random.default_rng(3), 0.01)
    cut = lengths < 20
    assert 0.008 < cut.mean() < 0.012
    assert (attn.sum(1) == lengths).all() and lengths.min() >= 1
    assert abs(lengths[lengths <= 20][(lengths <= 20)].mean() - 20) < 1  # most rows stay whole


def test_weights_are_bounded_by_eps_and_the_cap():
    rng = np.random.default_rng(4)
    _, noised, p = D.noise_rows(np.zeros((20000, 8), np.int64), rng, t_high=0.01, mask_id=MASK)
    w, units = D.loss_weights(noised, p, "llada")
    assert w.max() <= 1 / D.EPS + 1e-3 and w.max() > 100 and (units == 8).all()
    w, _ = D.loss_weights(noised, p, "llada", reweight_cap=10.0)
    assert w.max() == pytest.approx(10.0)
    w, units = D.loss_weights(noised, p, "dllm")
    has = noised.any(1)
    assert np.allclose(w.sum(1)[has], 1.0) and (units == has).all()


def hand_ce(logits, y, smoothing=0.0):
    lp = [v - math.log(sum(math.exp(u) for u in logits)) for v in logits]
    return -(1 - smoothing) * lp[y] - smoothing * sum(lp) / len(lp)


def test_losses_equal_hand_computation():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, MASK, (3, 6), generator=g)
    noised = torch.tensor([[1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1], [1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    p = np.array([0.3, 0.1, 0.9])
    noisy = torch.where(noised, MASK, clean)
    f = Toy(seed=9)
    logits = f(noisy).tolist()
    labels = torch.where(noised, clean, IGNORE_INDEX)
    for kind, smooth in (("llada", 0.0), ("soft_ce", 0.1), ("dllm", 0.0)):
        w, units = D.loss_weights(noised.numpy(), p, kind)
        batch = {"ids": noisy, "labels": labels, "weight": torch.from_numpy(w), "count": torch.from_numpy(units)}
        total, count = D.diffusion_loss(f, batch, smoothing=smooth)
        ce = [[hand_ce(logits[b][t], int(clean[b, t]), smooth) if noised[b, t] else 0.0 for t in range(6)]
              for b in range(3)]
        if kind == "dllm":  # mean CE per sequence, mean over sequences
            want = sum(sum(r) / sum(m) for r, m in zip(ce, noised.tolist())) / 3
        else:  # sum CE / p over masked tokens / (b * l)
            want = sum(sum(r) / p[b] for b, r in enumerate(ce)) / (3 * 6)
        assert float(total / count) == pytest.approx(want, rel=1e-5), kind


def test_weighted_ce_in_chunks_matches_full_logits_with_gradients():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(11, 8, generator=g, requires_grad=True)
    W = torch.randn(V, 8, generator=g, requires_grad=True)
    y = torch.randint(0, V, (11,), generator=g)
    w = torch.rand(11, generator=g)
    a = D.weighted_ce(h, W, y, w, smoothing=0.1, chunk_rows=3)
    ga = torch.autograd.grad(a, (h, W))
    b = (F.cross_entropy(h @ W.T, y, reduction="none", label_smoothing=0.1) * w).sum()
    gb = torch.autograd.grad(b, (h, W))
    assert torch.allclose(a, b, atol=1e-5)
    assert all(torch.allclose(x, z, atol=1e-5) for x, z in zip(ga, gb))


# ---------------------------------------------------------------------------------------
# SFT

class CharTok:
    """One id per character (ord % 1000): enough to check prompts, answers and the chat template."""

    def encode(self, text, allow_special=True):
        return [ord(ch) % 1000 for ch in text]


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return str(path)


def test_sft_records_system_prompts_multi_turn_and_bad_records(tmp_path):
    h, g = "human", "gpt"
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"conversations": [{"from": h, "value": "q1"}, {"from": g, "value": "a1"}]},
        {"system": "be brief", "conversations": [{"from": h, "value": "x"}, {"from": g, "value": "y"},
                                                 {"from": h, "value": "z"}, {"from": g, "value": "w"}]}])
    convs = D.read_conversations(path)
    assert convs == [("", [("q1", "a1")]), ("be brief", [("x", "y"), ("z", "w")])]
    tok = CharTok()
    ids, plen, dropped = D.sft_examples(convs, tok, 64)
    assert ids.shape == (3, 64) and dropped == 0
    turn = lambda role, text: [D.IM_START_ID] + tok.encode(f"{role}\n{text}") + [D.EOT_ID] + tok.encode("\n")
    head = [D.IM_START_ID] + tok.encode("assistant\n")
    # the second pair of the multi-turn record: system, the first exchange, then the question
    p2 = turn("system", "be brief") + turn("user", "x") + turn("assistant", "y") + turn("user", "z") + head
    assert plen[2] == len(p2) and ids[2, :plen[2]].tolist() == p2
    assert ids[2, plen[2]:plen[2] + 2].tolist() == tok.encode("w") + [D.EOT_ID]
    assert (ids[2, plen[2] + 2:] == EOS_ID).all()  # EOS padding belongs to the answer
    assert ids[0, :plen[0]].tolist() == turn("user", "q1") + head
    assert D.sft_examples(convs, tok, 45)[2] == 1  # the long multi-turn pair is dropped and counted
    bad = {"not JSON": "{oops", "no 'conversations' list": json.dumps({"conv": []}),
           "turn 1 must be": json.dumps({"conversations": [{"from": h, "value": "q"}, {"from": h, "value": "a"}]}),
           "no gpt answer": json.dumps({"conversations": [{"from": h, "value": "q"}]}),
           "'system' must be": json.dumps({"system": 3, "conversations": [{"from": h, "value": "q"}]})}
    for what, rec in bad.items():
        good = {"conversations": [{"from": h, "value": "ok"}, {"from": g, "value": "ok"}]}
        p = write_jsonl(tmp_path / "bad.jsonl", [good, rec])
        with pytest.raises(ValueError, match=f"bad.jsonl line 2: .*{what}") as e:
            D.read_conversations(p)
        assert "\n" not in str(e.value)


def test_sft_never_masks_the_prompt_and_its_loss_is_the_hand_value():
    T, B = 12, 400
    ids = np.random.default_rng(0).integers(0, MASK, size=(B, T))
    plen = np.random.default_rng(1).integers(1, T, size=B)
    rows = D.sft_rows(ids, plen, lambda k: np.random.default_rng([5, k]), 0, mask_id=MASK)
    noised = rows["labels"] != IGNORE_INDEX
    pos = np.arange(T)[None]
    assert not (noised & (pos < plen[:, None])).any()
    assert (rows["ids"][pos.repeat(B, 0) < plen[:, None]] == ids[pos.repeat(B, 0) < plen[:, None]]).all()
    assert noised.any(1).mean() > 0.3  # and answers are noised
    # hand value on 3 rows: sum over masked answer tokens of CE / (p * answer length), / b
    small = {k: torch.from_numpy(v[:3]) for k, v in rows.items()}
    f = Toy(seed=2)
    logits = f(small["ids"]).tolist()
    ps = [float(1 / (small["weight"][b][small["labels"][b] != IGNORE_INDEX][0] * (T - plen[b])))
          if (small["labels"][b] != IGNORE_INDEX).any() else 1.0 for b in range(3)]
    want = 0.0
    for b in range(3):
        for t in range(T):
            if small["labels"][b, t] != IGNORE_INDEX:
                want += hand_ce(logits[b][t], int(ids[b, t])) / (ps[b] * (T - plen[b]))
    total, count = D.diffusion_loss(f, small)
    assert float(count) == 3 and float(total / count) == pytest.approx(want / 3, rel=1e-5)
    # the weights' p is the p_mask the noise used: the masked fraction of answers matches it on average
    frac = [noised[b, plen[b]:].mean() for b in range(B)]
    pm = [1 / (rows["weight"][b][noised[b]][0] * (T - plen[b])) for b in range(B) if noised[b].any()]
    assert abs(np.mean(frac) - np.mean(pm) * len(pm) / B) < 0.05


# ---------------------------------------------------------------------------------------
# the real model: block attention, prefix cache, Monte-Carlo likelihood

def tiny_qwen3(vocab=V, seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=layers,
                      num_encoder_layers=0, num_heads=4, num_kv_heads=2, head_dim=16, max_seq_len=512)
    model = Qwen3(cfg).eval()
    with torch.no_grad():  # weights large enough that attention matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "embed" not in name:
                p.normal_(0.0, 0.2)
    return model


def test_block_attention_isolates_earlier_blocks():
    model = tiny_qwen3()
    P, bl, T = 5, 4, 17
    ids = torch.randint(0, MASK, (2, T), generator=torch.Generator().manual_seed(0))
    for see_earlier in (True, False):
        mask = D.block_attention_mask(P, T, bl, see_earlier).expand(2, T, T)
        base = model(ids, attn="bidirectional", attn_mask=mask)[0]
        for k in range(2):  # perturb block k+1 (and everything after): block k and the prompt do not move
            lo = P + (k + 1) * bl
            other = ids.clone()
            other[:, lo:] = (other[:, lo:] + 7) % MASK
            out = model(other, attn="bidirectional", attn_mask=mask)[0]
            assert torch.equal(out[:, :lo], base[:, :lo])
            assert not torch.allclose(out[:, lo:], base[:, lo:])
        if not see_earlier:  # block 2 does not see block 1 either
            other = ids.clone()
            other[:, P:P + bl] = (other[:, P:P + bl] + 3) % MASK
            out = model(other, attn="bidirectional", attn_mask=mask)[0]
            assert torch.equal(out[:, P + bl:P + 2 * bl], base[:, P + bl:P + 2 * bl])
    # the mask by hand for one small case: prompt 2, blocks of 2
    m = D.block_attention_mask(2, 6, 2, True)[0].int().tolist()
    assert m == [[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0],
                 [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]


def test_forward_kv_equals_the_model():
    model = tiny_qwen3(seed=1)
    ids = torch.randint(0, MASK, (2, 12), generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, 12, dtype=torch.bool)
    am[0, :3] = False
    want = model.hidden(ids, am, attn="bidirectional")
    pos = D._positions(am, 12, ids.device)
    h, kv = D.forward_kv(model, ids, pos, D.full_attention_mask(am))
    assert torch.allclose(h[am], want[am], atol=1e-5)
    # split: the last 5 positions against the cached keys of the first 7
    h2, _ = D.forward_kv(model, ids[:, 7:], pos[:, 7:], D.full_attention_mask(am)[:, 7:],
                         past=[(k[:, :, :7], v[:, :, :7]) for k, v in kv])
    assert torch.allclose(h2, want[:, 7:], atol=1e-5)


@pytest.mark.parametrize("cfg", [0.0, 1.0])
def test_prefix_cache_is_exact_under_block_attention(cfg):
    model = tiny_qwen3(seed=2)
    prompt = torch.randint(0, MASK, (2, 6), generator=torch.Generator().manual_seed(2))
    am = torch.ones(2, 6, dtype=torch.long)
    am[1, :2] = 0
    kw = dict(steps=12, gen_length=12, block_length=4, mask_id=MASK, block_attention=True, cfg_scale=cfg,
              attention_mask=am)
    plain = D.generate(model, prompt, **kw)
    for cache in ("prefix", "dual"):
        assert torch.equal(D.generate(model, prompt, cache=cache, **kw), plain)
    # with full attention the cache is an approximation; it runs the same number of steps
    kw["block_attention"] = False
    stats = {}
    out = D.generate(model, prompt, cache="prefix", stats=stats, **kw)
    assert stats["nfe"] == 12 and torch.equal(out[:, :6], prompt)


def test_threshold_decoding_commits_confident_tokens_together():
    model = tiny_qwen3(seed=3)
    prompt = torch.randint(0, MASK, (1, 6), generator=torch.Generator().manual_seed(3))
    # threshold decoding never predicts the mask token; forbid it in the plain run too (as "EOS") to compare
    kw = dict(steps=16, gen_length=16, block_length=8, mask_id=MASK, logits_eos_inf=True, eos_id=MASK)
    s_low, s_high = {}, {}
    low = D.generate(model, prompt, threshold=0.0, stats=s_low, **kw)  # everything at once per block
    high = D.generate(model, prompt, threshold=1.01, stats=s_high, **kw)  # one per step = plain top-1
    assert s_low["nfe"] == 2 and s_high["nfe"] == 16
    assert torch.equal(high, D.generate(model, prompt, **kw))  # 16 steps for 16 tokens: one per step
    logits = model(torch.cat([prompt, torch.full((1, 16), MASK)], 1), attn="bidirectional")[0]
    assert torch.equal(low[:, 6:14], logits[:, 6:14, :MASK].argmax(-1))


def test_mc_log_likelihood_matches_exact_enumeration():
    """For a 2-token answer the expectation over l and the masked set is a finite sum: compute it exactly."""
    model = tiny_qwen3(seed=4)
    prompt, answer = torch.tensor([3, 5, 7]), torch.tensor([11, 13])
    seq = torch.cat([prompt, answer])

    def ce_masked(which):
        x = seq.clone()[None]
        x[0, [3 + i for i in which]] = MASK
        lp = model(x, attn="bidirectional")[0][0].detach().log_softmax(-1)
        return -sum(float(lp[3 + i, answer[i]]) for i in which)

    # l = 1 (prob 1/2): either token alone, weight 2/1; l = 2: both, weight 1
    exact = 0.5 * 0.5 * (ce_masked([0]) + ce_masked([1])) * 2 + 0.5 * ce_masked([0, 1])
    est = D.mc_log_likelihood(model, prompt, answer, mc_num=2000, batch_size=500, mask_id=MASK)
    assert est == pytest.approx(-exact, rel=0.02)


def test_save_and_load_roundtrip_keeps_logits(tmp_path):
    model = tiny_qwen3(vocab=151936, seed=5, layers=1)
    model.save_pretrained(str(tmp_path / "m"))
    back = Qwen3.from_pretrained(str(tmp_path / "m")).eval()
    ids = torch.tensor([[1, 2, D.MASK_ID, 4]])
    assert torch.equal(model(ids, attn="bidirectional")[0], back(ids, attn="bidirectional")[0])


# ---------------------------------------------------------------------------------------
# the objective interface and a tiny model trained here

class IntTokenizer:
    """Documents of space-separated ids (shards.prepare's tokenizer interface)."""
    vocab_size, eos_id, fingerprint = 152036, EOS_ID, "synthetic-ints"

    def encode_batch(self, docs, allow_special=False):
        return [[int(t) for t in d.split()] for d in docs]

    def encode_documents(self, docs):
        return np.array([i for ids in self.encode_batch(docs) for i in ids + [EOS_ID]], dtype=np.uint32)


def write_shards(out_dir, docs=30):
    import shards
    rng = np.random.default_rng(0)
    texts = [" ".join(map(str, rng.integers(0, 1000, size=200))) for _ in range(docs)]
    splits = {"train": lambda s: iter(texts[s:docs - 8]), "val": lambda s: iter(texts[docs - 8 + s:])}
    shards.prepare(out_dir, splits, IntTokenizer(), tokens_per_shard=4000, source={"synthetic": 0})
    return out_dir


def test_objective_rows_are_deterministic_and_split_independent(tmp_path):
    data = write_shards(str(tmp_path / "data"))
    c = SimpleNamespace(seed=3, dec_len=32, data_dir=data, eval_interval=1, **D.CONFIG)
    c.diffusion_shorten_prob = 0.2
    obj = D.Objective(c, ModelConfig(vocab_size=151936, num_encoder_layers=0), 0, 1)
    a = obj.train_batch(0, 10, 8)
    b1, b2 = obj.train_batch(0, 10, 3), obj.train_batch(0, 13, 5)
    for k in a:
        assert np.array_equal(a[k], np.concatenate([b1[k], b2[k]])), k
    assert (a["ids"][a["labels"] != IGNORE_INDEX] == D.MASK_ID).all()
    assert (a["mask"].sum(1) == a["count"]).all()
    e = obj.eval_batch(0, 6)
    assert e["group"].tolist() == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(e["ids"], obj.eval_batch(0, 6)["ids"])
    cond = e["labels"][3:] != IGNORE_INDEX
    assert not cond[:, :16].any() and cond.any(1).all()  # the prompt half is never masked
    model = tiny_qwen3(vocab=151936, seed=0, layers=1)
    loss, count = obj.loss(model, {k: torch.from_numpy(v) for k, v in a.items()})
    assert loss.dtype == torch.float32 and float(count) == a["count"].sum() and torch.isfinite(loss)
    c.diffusion_loss = "nope"
    with pytest.raises(ValueError, match="diffusion_loss"):
        D.Objective(c, ModelConfig(vocab_size=151936, num_encoder_layers=0), 0, 1)


# a deterministic corpus: permutations of ten "digit" tokens, so a masked token is pinned by the others
CORPUS = [[4, 9, 1, 7, 3, 0, 8, 2, 6, 5], [2, 6, 0, 8, 5, 1, 9, 4, 7, 3], [7, 1, 5, 3, 9, 6, 2, 0, 4, 8]]
TV, TMASK = 12, 11  # ten digits, an unused row, the mask


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = tiny_qwen3(vocab=TV, seed=0)
    model.apply(lambda m: m.reset_parameters() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) else None)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    steps = 300
    for step in range(steps):
        for gr in opt.param_groups:
            gr["lr"] = 3e-3 * min(1.0, (step + 1) / 20, 2 * (steps - step) / steps)
        clean = np.array([CORPUS[i] for i in rng.integers(0, 3, size=32)])
        noisy, noised, p = D.noise_rows(clean, rng, mask_id=TMASK)
        w, units = D.loss_weights(noised, p, "llada")
        batch = {"ids": torch.from_numpy(noisy), "labels": torch.from_numpy(np.where(noised, clean, IGNORE_INDEX)),
                 "weight": torch.from_numpy(w), "count": torch.from_numpy(units)}
        loss, count = D.diffusion_loss(model, batch)
        opt.zero_grad()
        (loss / count).backward()
        opt.step()
    return model.eval(), float(loss.detach() / count)


def test_trained_model_unmasks_and_regenerates_the_corpus(trained):
    model, final = trained
    rng = np.random.default_rng(1)
    clean = np.array([CORPUS[i % 3] for i in range(300)])
    noised = rng.random(clean.shape) < 0.15
    noised[noised.sum(1) == 0, 0] = True
    noisy = np.where(noised, TMASK, clean)
    with torch.no_grad():
        pred = model(torch.from_numpy(noisy), attn="bidirectional")[0].argmax(-1).numpy()
    acc = (pred[noised] == clean[noised]).mean()
    assert acc >= 0.9, f"recovered {acc:.3f} of masked tokens (final loss {final:.3f})"
    for seq in CORPUS:  # the memorised continuation from a 3-token prompt
        prompt = torch.tensor([seq[:3]])
        out = D.generate(model, prompt, steps=7, gen_length=7, block_length=7, mask_id=TMASK)
        assert out[0].tolist() == seq


# ---------------------------------------------------------------------------------------
# sample.py --mode diffusion

DIGIT0 = 15  # Qwen's BPE: "0" -> 15 ... "9" -> 24


class DigitTokenizer:
    def encode(self, text, allow_special=True):
        return [DIGIT0 + int(c) for c in text]

    def decode(self, ids):
        return "".join(str(t - DIGIT0) if DIGIT0 <= t < DIGIT0 + 10 else f"<{t}>" for t in ids)


def full_vocab(small):
    """The trained 12-row model as a 151,936-row Qwen3: digits at Qwen's digit ids, its mask row at MASK_ID,
    every other row a copy of its never-trained row 10."""
    full = Qwen3(ModelConfig(**{**small.cfg.to_dict(), "vocab_size": 151936})).eval()
    sd = small.state_dict()
    w = sd["embed.weight"]
    big = w[10].repeat(151936, 1)
    big[DIGIT0:DIGIT0 + 10] = w[:10]
    big[D.MASK_ID] = w[TMASK]
    sd["embed.weight"] = big
    full.load_state_dict(sd)
    return full


def test_sample_cli_diffusion_mode(trained, tmp_path, monkeypatch, capsys):
    import sample
    import tokenizer
    monkeypatch.setattr(tokenizer, "load_tokenizer", lambda name=None: DigitTokenizer(), raising=False)
    ckpt = str(tmp_path / "ckpt")
    full_vocab(trained[0]).save_pretrained(ckpt)
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join("".join(map(str, s[:3])) + "\n" for s in CORPUS))
    want = ["".join(map(str, s)) for s in CORPUS]
    sample.main(["--ckpt", ckpt, "--mode", "diffusion", "--prompt_file", str(prompts), "--max_new_tokens", "7",
                 "--batch_size", "2"])
    assert capsys.readouterr().out.splitlines()[::2] == want
    for extra in (["--threshold", "0.5", "--cache", "prefix"], ["--block_length", "7", "--steps", "14"]):
        sample.main(["--ckpt", ckpt, "--mode", "diffusion", "--prompt", "260", "--max_new_tokens", "7"] + extra)
        assert capsys.readouterr().out.splitlines() == [want[1]]
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", ckpt, "--mode", "diffusion", "--prompt", "1", "--max_new_tokens", "7",
                     "--block_length", "2"])
    assert "multiple of --block_length" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# through train.py

@pytest.fixture
def train_with_diffusion(monkeypatch):
    """train.py with objective='diffusion' (the table entry is the lead's; added here if it is missing)."""
    import train
    if "diffusion" not in train.OBJECTIVES:
        monkeypatch.setitem(train.OBJECTIVES, "diffusion", "diffusion")
        monkeypatch.setattr(train, "DEFAULTS", {**train.DEFAULTS, **D.CONFIG})
    return train


def test_train_py_runs_the_objective_and_saves_a_loadable_qwen3(tmp_path, train_with_diffusion):
    train = train_with_diffusion
    data = write_shards(str(tmp_path / "data"), docs=40)
    out = str(tmp_path / "out")
    args = [f"--out_dir={out}", "--objective=diffusion", "--model_preset=tiny", f"--data_dir={data}",
            "--max_iters=30", "--batch_size=8", "--dec_len=32", "--eval_interval=30", "--eval_iters=2",
            "--log_interval=10", "--warmup_iters=5", "--learning_rate=3e-3", "--trim_vocab=True", "--device=cpu",
            "--prefetch=1"]
    train.main(args)
    log = [json.loads(l) for l in open(f"{out}/log.jsonl")]
    vals = [r for r in log if "val_loss" in r]
    assert len(vals) == 2 and {"val/elbo", "val/cond_nll"} <= set(vals[-1])
    assert vals[-1]["val/elbo"] < vals[0]["val/elbo"]  # it learns
    ckpt = train.list_checkpoints(out)[-1]
    model = Qwen3.from_pretrained(ckpt).eval()
    assert model.cfg.vocab_size == 151936
    x = torch.tensor([[5, 6, D.MASK_ID, 7]])
    assert torch.isfinite(model(x, attn="bidirectional")[0]).all()
    # SFT from that checkpoint, vocabulary trimmed to the shards' ids plus the conversations'
    h, g = "human", "gpt"
    convs = [{"system": "s", "conversations": [{"from": h, "value": f"question {i}"}, {"from": g, "value": f"answer {i}"}]}
             for i in range(20)]
    sft_train = write_jsonl(tmp_path / "train.jsonl", convs)
    sft_val = write_jsonl(tmp_path / "val.jsonl", convs[:4])
    out2 = str(tmp_path / "sft")
    train.main([f"--out_dir={out2}", "--objective=diffusion", "--diffusion_data=sft", "--init_from=qwen3",
                f"--qwen3_path={ckpt}", f"--data_dir={data}", f"--diffusion_sft_train={sft_train}",
                f"--diffusion_sft_val={sft_val}", "--max_iters=4", "--batch_size=4", "--dec_len=32",
                "--eval_interval=4", "--eval_iters=1", "--trim_vocab=True", "--device=cpu", "--prefetch=1"])
    log = [json.loads(l) for l in open(f"{out2}/log.jsonl")]
    assert all(math.isfinite(r["val_loss"]) for r in log if "val_loss" in r)
    assert Qwen3.from_pretrained(train.list_checkpoints(out2)[-1]).cfg.vocab_size == 151936


def test_squad_sft_prepare_writes_readable_conversations(tmp_path):
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location(
        "squad_prepare", os.path.join(os.path.dirname(D.__file__), "data", "squad_sft", "prepare.py"))
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    squad = {"version": "1.1", "data": [
        {"title": f"T{i}", "paragraphs": [{"context": f"Passage {i}.", "qas": [
            {"question": f"Q{i}{j}?", "id": f"{i}{j}", "answers": [{"text": f"A{i}{j}", "answer_start": 0}]}
            for j in range(2)]}]} for i in range(4)]}
    src = tmp_path / "squad.json"
    src.write_text(json.dumps(squad))
    prep.main(["--input", str(src), "--out", str(tmp_path / "o"), "--val_every", "2"])
    train, val = (D.read_conversations(str(tmp_path / "o" / f"{s}.jsonl")) for s in ("train", "val"))
    assert len(train) == len(val) == 4
    assert val[0] == (prep.SYSTEM, [("Passage 1.\n\nQuestion: Q10?", "A10")])
    titles = lambda convs: {c[1][0][0].split(".")[0] for c in convs}
    assert not titles(train) & titles(val)  # whole articles per split
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="not SQuAD"):
        prep.main(["--input", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")])
