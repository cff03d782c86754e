"""sample.py: cached generation against a naive loop, the sampler against softmax, and a tiny model
trained here on a digit corpus that must fill its masked spans and continue its prefixes."""
import json
import os
import random
from dataclasses import replace

import pytest
import torch

import tokenizer
from model import EncoderDecoder
from model_config import get_preset
from sample import encode_prompt, fill_spans, generate, main, pad_batch, resolve_ckpt, sample_next, split_spans
from tokenizer import DECODER_START_ID, EOS_ID, IGNORE_INDEX, MODE_IDS, PAD_ID, SENTINEL_START, VOCAB_SIZE

DIGIT0 = 15  # Qwen's BPE gives every digit its own token: "0" -> 15 ... "9" -> 24
SPACE = 220  # and a space before a digit a token of its own
SENT = [SENTINEL_START + i for i in range(3)]


class DigitTokenizer:
    """Stand-in for the project tokenizer on digit strings, with Qwen's digit ids."""

    def encode(self, text):
        return [SPACE if c == " " else DIGIT0 + int(c) for c in text]

    def decode(self, ids):
        return "".join(str(t - DIGIT0) if DIGIT0 <= t < DIGIT0 + 10 else " " if t == SPACE else
                       f"<extra_id_{t - SENTINEL_START}>" if t >= SENTINEL_START else f"<{t}>" for t in ids)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Generation and training here are thousands of tiny ops: on a shared 2-core machine a second
    thread only adds synchronisation (3-10x slower), so this module runs on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(seed=0, **overrides):
    """Random weights large enough that the blocks matter: at the 0.02 init the tied head mostly echoes
    the input token, and greedy decoding would repeat the start token forever (a too-easy test)."""
    torch.manual_seed(seed)
    model = EncoderDecoder(get_preset("tiny_encdec", **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "embed" not in name:
                p.normal_(0.0, 0.2)
    return model


def random_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[MODE_IDS["R"]] + torch.randint(0, 151643, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------------------------------
# the sampler and the cache

def test_sampler_follows_softmax_top_k_and_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    n = 40000

    def freqs(**kw):
        g = torch.Generator().manual_seed(0)
        draws = sample_next(logits.expand(n, -1), generator=g, **kw)
        return torch.bincount(draws, minlength=6).float() / n

    def softmax(x):  # by hand, as the reference
        e = [2.718281828459045 ** v for v in x]
        return torch.tensor([v / sum(e) for v in e])

    assert (freqs(temperature=1.0) - softmax(logits.tolist())).abs().max() < 0.01
    assert (freqs(temperature=0.5) - softmax((logits / 0.5).tolist())).abs().max() < 0.01
    # top_k=2 keeps ids 0 and 5 only, renormalised
    ref = torch.zeros(6)
    ref[[0, 5]] = softmax([2.0, 1.5])
    assert (freqs(temperature=1.0, top_k=2) - ref).abs().max() < 0.01
    # probabilities sorted: .420 .255 .154 .094 .057 .021 (ids 0 5 1 2 3 4): top_p=0.7 keeps the first
    # three (the mass before id 1 is .675 < .7), top_p=0.6 the first two (.420 < .6 <= .675)
    p = softmax(logits.tolist())
    for top_p, keep in ((0.7, [0, 5, 1]), (0.6, [0, 5])):
        ref = torch.zeros(6)
        ref[keep] = p[keep] / p[keep].sum()
        assert (freqs(temperature=1.0, top_p=top_p) - ref).abs().max() < 0.01
    assert torch.equal(sample_next(logits[None], temperature=0.0), torch.tensor([0]))
    assert torch.equal(sample_next(logits[None], temperature=1.0, top_p=1e-6), torch.tensor([0]))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_cached_generation_equals_naive_loop(side, sampled):
    model = random_model()
    enc_ids, enc_mask = pad_batch(random_prompts([9, 4, 13]), side=side)
    kw = dict(temperature=1.0, top_k=1000, top_p=0.95) if sampled else {}
    runs = [generate(model, enc_ids, enc_mask, 20, generator=torch.Generator().manual_seed(7), use_cache=c,
                     eos_id=None, **kw) for c in (True, False)]
    assert runs[0] == runs[1]
    assert all(len(r) == 20 and len(set(r)) > 5 for r in runs[0])  # varied tokens, not an echo
    if sampled:  # the draw really is random: another seed, other tokens
        other = generate(model, enc_ids, enc_mask, 20, generator=torch.Generator().manual_seed(8), eos_id=None, **kw)
        assert other != runs[0]


def test_padding_and_batching_do_not_change_tokens():
    model = random_model(seed=1)
    prompts = random_prompts([3, 11, 6], seed=2)
    alone = [generate(model, *pad_batch([p]), 12, eos_id=None)[0] for p in prompts]
    assert all(len(set(r)) > 5 for r in alone)
    for side in ("right", "left"):
        assert generate(model, *pad_batch(prompts, side=side), 12, eos_id=None) == alone


# ---------------------------------------------------------------------------------------
# prompts and spans, by hand

def test_encode_prompt_cuts_sentinels_and_rejects_bad_ones():
    tok = DigitTokenizer()
    assert encode_prompt(tok, "12<extra_id_0>3<extra_id_7>") == [16, 17, SENTINEL_START, 18, SENTINEL_START + 7]
    assert encode_prompt(tok, "<extra_id_99>") == [SENTINEL_START + 99]
    # the space before a sentinel goes (the span brings its own), the one after it stays
    assert encode_prompt(tok, "1  <extra_id_0> 2") == [16, SPACE, SENTINEL_START, SPACE, 17]
    with pytest.raises(ValueError, match=r"<extra_id_100> is out of range"):
        encode_prompt(tok, "1<extra_id_100>")
    with pytest.raises(ValueError, match="appears twice"):
        encode_prompt(tok, "<extra_id_1>2<extra_id_1>")


def test_fill_spans_puts_each_span_at_its_sentinel():
    s0, s1, s2 = SENT
    prompt = [1, s0, 2, s1, 3, s2]
    # spans out of order; tokens before the first sentinel and a repeated sentinel's span are dropped
    target = [9, s1, 20, 21, s0, 10, s1, 99]
    assert split_spans(target) == {s1: [20, 21], s0: [10]}
    assert fill_spans(prompt, target) == [1, 10, 2, 20, 21, 3, s2]  # s2 got no span: it stays


# ---------------------------------------------------------------------------------------
# a tiny model trained on a digit corpus

# each line a permutation of the ten digits: a span is then pinned down by its neighbours
CORPUS = ["6897530412", "4826590713", "7281405936"]
R, S = MODE_IDS["R"], MODE_IDS["S"]
FILLER = 30  # a row that is never input nor target: the training pushes its logit down everywhere
REAL_IDS = [DIGIT0 + d for d in range(10)] + [EOS_ID, R, S] + SENT + [FILLER]


def digits(text):
    return [DIGIT0 + int(c) for c in text]


def corrupt(seq, spans):
    """(encoder input, target) for span corruption of seq at spans [(start, length), ...] in order."""
    enc, target, pos = [R], [], 0
    for i, (start, length) in enumerate(spans):
        enc += seq[pos:start] + [SENT[i]]
        target += [SENT[i]] + seq[start:start + length]
        pos = start + length
    return enc + seq[pos:], target + [EOS_ID]


def random_example(rng):
    seq = digits(rng.choice(CORPUS))
    if rng.random() < 0.3:  # prefix LM
        cut = rng.randint(3, 7)
        return [S] + seq[:cut], seq[cut:] + [EOS_ID]
    lengths = [rng.randint(1, 3) for _ in range(rng.randint(1, 2))]
    while True:  # span starts anywhere, as long as spans neither overlap nor touch
        spans = sorted((rng.randint(0, len(seq) - n), n) for n in lengths)
        if all(a + n < b for (a, n), (b, _) in zip(spans, spans[1:])):
            break
    return corrupt(seq, spans)


def expand_vocab(small):
    """The compact-vocabulary model as a full-vocabulary one: its rows go to their real ids and every
    other row copies the filler's, so the full model's argmax is the compact model's."""
    full = EncoderDecoder(replace(small.cfg, vocab_size=VOCAB_SIZE)).eval()
    sd = small.state_dict()
    w = sd["embed.weight"]
    big = w[REAL_IDS.index(FILLER)].repeat(VOCAB_SIZE, 1)
    big[REAL_IDS] = w
    sd["embed.weight"] = big
    full.load_state_dict(sd)
    return full


@pytest.fixture(scope="module")
def trained():
    """Trained with the model's own loss in a 17-token vocabulary (the 152K-row LM head would cost
    ~100x more per step on CPU), then mapped back to the real ids."""
    torch.manual_seed(0)
    to_small = {t: i for i, t in enumerate(REAL_IDS)}
    model = EncoderDecoder(get_preset("tiny_encdec", vocab_size=len(REAL_IDS)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.0)
    rng = random.Random(0)
    steps = 600
    with torch.enable_grad():
        for step in range(steps):
            for group in opt.param_groups:  # warm up, hold, then decay linearly over the second half
                group["lr"] = 3e-3 * min((step + 1) / 20, 1.0, 2 * (steps - step) / steps)
            batch = [random_example(rng) for _ in range(16)]
            enc_ids, enc_mask = pad_batch([[to_small[t] for t in e] for e, _ in batch], pad_id=to_small[PAD_ID])
            width = max(len(t) for _, t in batch)
            labels = torch.tensor([[to_small[x] for x in t] + [IGNORE_INDEX] * (width - len(t)) for _, t in batch])
            dec_ids = torch.cat([torch.full((len(batch), 1), to_small[DECODER_START_ID]), labels[:, :-1]], 1)
            dec_ids[dec_ids == IGNORE_INDEX] = to_small[PAD_ID]
            _, loss = model(enc_ids, enc_mask, dec_ids, labels=labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return expand_vocab(model.eval()), loss.item()


def test_trained_model_fills_masked_spans_and_continues(trained):
    model, final_loss = trained
    cases = []  # (encoder input, expected target, what the filled prompt must read)
    for k, text in enumerate(CORPUS):
        seq = digits(text)
        for spans in ([(k, 2)], [(9 - k, 1)], [(1, 3), (7 - k % 3, 2)], [(0, 1), (5, 1)]):
            enc, target = corrupt(seq, spans)
            cases.append((enc, target[:-1], seq))
        enc, target = [S] + seq[:3 + k % 4], seq[3 + k % 4:]
        cases.append((enc, target, seq))
    enc_ids, enc_mask = pad_batch([enc for enc, _, _ in cases])
    targets = generate(model, enc_ids, enc_mask, 16)
    wrong = [(enc, got, want) for (enc, want, _), got in zip(cases, targets) if got != want]
    assert not wrong, f"{len(wrong)}/{len(cases)} wrong (final loss {final_loss:.3f}), first: {wrong[0]}"
    for (enc, _, seq), target in zip(cases, targets):
        shown = fill_spans(enc[1:], target) if enc[0] == R else enc[1:] + target
        assert shown == seq


@pytest.fixture
def trained_out_dir(trained, tmp_path):
    """A training out_dir: an older checkpoint, the newest complete one and a half-written one."""
    out = tmp_path / "out"
    random_model().save_pretrained(str(out / "ckpt-0000100"))
    trained[0].save_pretrained(str(out / "ckpt-0000400"))
    os.makedirs(out / "ckpt-0000500.tmp")
    (out / "ckpt-0000500.tmp" / "config.json").write_text("{")
    return str(out)


def use_tokenizer(monkeypatch, which):
    if which == "digits":
        monkeypatch.setattr(tokenizer, "load_tokenizer", lambda name=None: DigitTokenizer(), raising=False)
        return
    try:
        from tokenizer import load_tokenizer
        tok = load_tokenizer()
    except ImportError:
        pytest.skip("tokenizer.load_tokenizer is not there yet")
    assert tok.encode("0123456789 2") == list(range(DIGIT0, DIGIT0 + 10)) + [SPACE, 17]  # the trained ids


@pytest.mark.parametrize("which", ["digits", "project"])
def test_cli_fills_and_continues_from_an_out_dir(trained_out_dir, monkeypatch, capsys, which):
    use_tokenizer(monkeypatch, which)
    assert resolve_ckpt(trained_out_dir).endswith("ckpt-0000400")
    main(["--ckpt", trained_out_dir, "--prompt", "6897<extra_id_0>0412", "--show_target"])
    assert capsys.readouterr().out.splitlines() == ["6897530412", "target: <extra_id_0>53"]
    main(["--ckpt", trained_out_dir, "--mode", "S", "--prompt", "728140"])
    assert capsys.readouterr().out.splitlines() == ["7281405936"]


def test_cli_batches_a_prompt_file_and_samples(trained_out_dir, monkeypatch, capsys, tmp_path):
    use_tokenizer(monkeypatch, "digits")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("4826<extra_id_0>0713\n\n68<extra_id_0>7530<extra_id_1>\n")
    main(["--ckpt", trained_out_dir, "--prompt_file", str(prompts), "--batch_size", "1"])
    assert capsys.readouterr().out.splitlines() == ["4826590713", "-" * 40, "6897530412"]
    # sampling at a low temperature from a confident model still reads the corpus; 2 samples per prompt
    main(["--ckpt", trained_out_dir, "--prompt_file", str(prompts), "--num_samples", "2", "--temperature", "0.3",
          "--top_k", "5", "--top_p", "0.9", "--seed", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[::2] == ["4826590713"] * 2 + ["6897530412"] * 2


def test_cli_converts_a_qwen3_dir(hf_qwen3_dir, monkeypatch, capsys):
    use_tokenizer(monkeypatch, "digits")
    main(["--ckpt", hf_qwen3_dir, "--mode", "S", "--prompt", "12345", "--max_new_tokens", "4", "--show_target"])
    out = capsys.readouterr().out.splitlines()
    # the same continuation by hand: S-mode token + prefix into the model converted from the same files
    model = EncoderDecoder.from_qwen3(hf_qwen3_dir).eval()
    target = generate(model, *pad_batch([[S] + digits("12345")]), 4)[0]
    tok = DigitTokenizer()
    assert out == ["12345" + tok.decode(target), "target: " + tok.decode(target)]


def one_line_error(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert msg.startswith("sample.py: ") and "\n" not in msg
    return msg


def test_bad_input_gives_one_line_errors(tmp_path, monkeypatch):
    use_tokenizer(monkeypatch, "digits")
    assert "no such directory" in one_line_error(["--ckpt", str(tmp_path / "nope"), "--prompt", "1<extra_id_0>"])
    os.makedirs(tmp_path / "empty")
    assert "no complete ckpt-NNNNNNN" in one_line_error(["--ckpt", str(tmp_path / "empty"), "--prompt", "1<extra_id_0>"])
    ckpt = str(tmp_path / "short")
    random_model(max_seq_len=16).save_pretrained(ckpt)
    assert json.load(open(os.path.join(ckpt, "config.json")))["max_seq_len"] == 16
    assert "out of range" in one_line_error(["--ckpt", ckpt, "--prompt", "1<extra_id_100>"])
    assert "max_seq_len=16" in one_line_error(["--ckpt", ckpt, "--prompt", "1" * 15 + "<extra_id_0>"])
    assert "max_seq_len=16" in one_line_error(["--ckpt", ckpt, "--prompt", "1<extra_id_0>", "--max_new_tokens", "16"])
    assert "--mode S" in one_line_error(["--ckpt", ckpt, "--prompt", "123"])
    main(["--ckpt", ckpt, "--prompt", "1" * 14 + "<extra_id_0>", "--max_new_tokens", "15"])  # just fits
