"""Tests for ul2.py: exact reconstruction, T5 span statistics, mixture weights, layout, determinism."""
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ul2  # noqa: E402
from tokenizer import (DECODER_START_ID, EOS_ID, IGNORE_INDEX, MODE_IDS, NUM_SENTINELS, PAD_ID,  # noqa: E402
                       SENTINEL_START)

SPAN_DENOISERS = [d for d in ul2.DEFAULT_MIXTURE if d[0] != "S"]
S_DENOISER = [d for d in ul2.DEFAULT_MIXTURE if d[0] == "S"][0]


def text_windows(rng, n, length):
    """Random text ids, with <|endoftext|> sprinkled in (documents are joined by it) and ending some windows."""
    w = rng.integers(0, 151643, size=(n, length))
    w[rng.random((n, length)) < 0.02] = EOS_ID
    w[::3, -1] = EOS_ID
    return w


def is_sentinel(x):
    return (x >= SENTINEL_START) & (x < SENTINEL_START + NUM_SENTINELS)


def label_lengths(labels):
    return (labels != IGNORE_INDEX).sum(1)


# --- window length: hand computation -----------------------------------------------------

def test_window_len_hand_computed():
    # 512/512: the S split can leave a 1-token prefix, so its target is L-1 tokens + EOS <= 512 -> L = 512;
    # then R(3,0.15) needs 1 + 512 - 77 noise + 26 sentinels = 462 <= 512 input tokens.
    assert ul2.UL2(512, 512).window_len == 512
    # 128/512: R(3,0.15) binds. L=141: 21 noise, 7 spans -> 1+141-21+7 = 128. L=142: 21, 7 -> 129.
    # L=143: 21 (21.45), 7 -> 130. L=144: 22, ceil(7.33)=8 -> 131, and it only grows from there.
    u = ul2.UL2(128, 512)
    assert u.window_len == 141
    rng = np.random.default_rng(0)
    b = u.make_batch(text_windows(rng, 400, 141), step=0)
    r = np.flatnonzero(b["denoiser"] == 0)
    assert b["enc_mask"][r].sum(1).max() == 128  # the bound is tight
    assert b["enc_mask"].sum(1).max() <= 128 and label_lengths(b["labels"]).max() <= 512


def test_too_many_sentinels_and_bad_config_raise():
    with pytest.raises(ValueError, match="sentinels"):
        ul2.UL2(2048, 2048)  # R(3,0.15) would need 103 spans
    with pytest.raises(ValueError, match="kind"):
        ul2.UL2(64, 64, mixture=[("Q", 3, 0.15, 1)])
    with pytest.raises(ValueError, match="rate"):
        ul2.UL2(64, 64, mixture=[("R", 3, 1.5, 1)])
    with pytest.raises(ValueError, match="same denoisers"):
        ul2.UL2(64, 64, end_mixture=[("R", 4, 0.15, 1)] + ul2.DEFAULT_MIXTURE[1:], curriculum_iters=10)
    with pytest.raises(ValueError, match="curriculum_iters"):
        ul2.UL2(64, 64, end_mixture=[1, 1, 1, 1, 1])
    u = ul2.UL2(64, 64)
    with pytest.raises(ValueError, match="windows must be"):
        u.make_batch(np.zeros((2, u.window_len + 1), np.int64), step=0)


# --- span corruption against a hand-built example ------------------------------------------

def test_span_corruption_by_hand():
    w = np.arange(100, 110)[None]
    mask = np.array([[0, 1, 1, 0, 0, 1, 0, 0, 1, 1]], bool)
    body, target = ul2.span_corruption(w, mask)
    s0, s1, s2 = SENTINEL_START, SENTINEL_START + 1, SENTINEL_START + 2
    assert body.tolist() == [[100, s0, 103, 104, s1, 106, 107, s2]]
    assert target.tolist() == [[s0, 101, 102, s1, 105, s2, 108, 109]]


def test_noise_mask_counts_and_alternation():
    rng = np.random.default_rng(1)
    for length, n, k in [(50, 7, 3), (512, 256, 8), (40, 5, 1), (20, 10, 10)]:
        mask = ul2.random_spans_noise_mask(rng, 300, length, n, k)
        assert (mask.sum(1) == n).all()
        step = np.diff(mask.astype(np.int8), axis=1)
        noise_runs = mask[:, 0] + (step == 1).sum(1)  # runs of noise: an opening one plus each 0 -> 1 step
        clean_runs = ~mask[:, 0] + (step == -1).sum(1)
        assert (noise_runs == k).all() and (clean_runs == k).all()  # k of each, alternating
        assert (mask[:, 0] != mask[:, -1]).all()  # one end clean, the other noise
        assert 0.4 < mask[:, 0].mean() < 0.6  # mirrored about half the time


# --- reconstruction -------------------------------------------------------------------------

@pytest.mark.parametrize("enc_len,dec_len", [(64, 64), (128, 96), (512, 512)])
@pytest.mark.parametrize("denoiser", ul2.DEFAULT_MIXTURE, ids=lambda d: ul2.denoiser_name(*d[:3]))
def test_reconstruction_is_exact(denoiser, enc_len, dec_len):
    n = 200 if enc_len < 512 else 60
    for seed in range(3):
        u = ul2.UL2(enc_len, dec_len, mixture=[denoiser], seed=seed)
        w = text_windows(np.random.default_rng(seed + 10), n, u.window_len)
        b = u.make_batch(w, step=seed * 7, rank=seed)
        for i in range(n):
            got = ul2.reconstruct(b["enc_ids"][i], b["enc_mask"][i], b["labels"][i])
            np.testing.assert_array_equal(got, w[i])


def test_reconstruction_default_mixture_uint32_windows():
    u = ul2.UL2(256, 256)
    w = text_windows(np.random.default_rng(5), 300, u.window_len).astype(np.uint32)  # as read from shards
    b = u.make_batch(w, step=3)
    assert set(np.unique(b["denoiser"])) == set(range(5))
    for i in range(len(w)):
        np.testing.assert_array_equal(ul2.reconstruct(b["enc_ids"][i], b["enc_mask"][i], b["labels"][i]), w[i])


# --- statistics -------------------------------------------------------------------------------

def span_lengths(labels):
    """Lengths of all noise spans in a batch of span-corruption targets (sentinel ... sentinel ... EOS)."""
    pos = np.arange(labels.shape[1])
    eos = pos == (label_lengths(labels) - 1)[:, None]
    marker = is_sentinel(labels) | eos
    idx = np.flatnonzero(marker.ravel())
    from_sentinel = ~eos.ravel()[idx[:-1]]
    return (np.diff(idx) - 1)[from_sentinel]


def uniform_composition_marginal(n, k):
    """P(a given part = j) when n is cut into k positive parts, all compositions equally likely."""
    n, k = int(n), int(k)
    if k == 1:
        return (np.arange(1, n + 1) == n).astype(float)
    # the other k-1 parts share n-j tokens: C(n-j-1, k-2) ways, out of C(n-1, k-1) compositions
    return np.array([math.comb(n - j - 1, k - 2) if j < n else 0 for j in range(1, n + 1)], float) / math.comb(n - 1, k - 1)


@pytest.mark.parametrize("denoiser", SPAN_DENOISERS, ids=lambda d: ul2.denoiser_name(*d[:3]))
def test_span_statistics(denoiser):
    kind, mean_span, rate, _ = denoiser
    u = ul2.UL2(512, 512, mixture=[denoiser])
    L = u.window_len
    w = text_windows(np.random.default_rng(2), 10_000, L)
    b = u.make_batch(w, step=0)
    labels = b["labels"]
    spans = is_sentinel(labels).sum(1)
    noise = label_lengths(labels) - 1 - spans
    assert (noise == round(L * rate)).all()  # exactly round(L*rate) noise tokens, every example
    assert abs(noise.mean() / L / rate - 1) < 0.05
    lengths = span_lengths(labels)
    assert len(lengths) == spans.sum() and lengths.min() >= 1
    assert abs(lengths.mean() / mean_span - 1) < 0.05
    # span lengths follow a uniformly random segmentation: compare with the exact marginal
    n = round(L * rate)
    ks, counts = np.unique(spans, return_counts=True)
    expect = sum(c * k * uniform_composition_marginal(n, k) for k, c in zip(ks, counts)) / (counts * ks).sum()
    seen = np.bincount(lengths, minlength=n + 1)[1:] / len(lengths)
    assert 0.5 * np.abs(seen - expect).sum() < 0.03
    # mirrored half the time: about half the inputs open with a sentinel
    opens = is_sentinel(b["enc_ids"][:, 1]).mean()
    assert abs(opens - 0.5) < 0.03
    # sentinels are numbered 0, 1, 2 ... in the input and in the target
    for i in range(0, 10_000, 997):
        k = spans[i]
        assert (b["enc_ids"][i][is_sentinel(b["enc_ids"][i])] - SENTINEL_START).tolist() == list(range(k))
        assert (labels[i][is_sentinel(labels[i])] - SENTINEL_START).tolist() == list(range(k))


def test_prefix_lm_split():
    _, _, rate, _ = S_DENOISER
    u = ul2.UL2(512, 512, mixture=[S_DENOISER])
    L = u.window_len
    b = u.make_batch(text_windows(np.random.default_rng(3), 10_000, L), step=0)
    prefix = b["enc_mask"].sum(1) - 1
    target = label_lengths(b["labels"]) - 1
    assert (prefix + target == L).all()
    assert not is_sentinel(b["enc_ids"]).any() and not is_sentinel(b["labels"]).any()
    assert abs(target.mean() / L / rate - 1) < 0.05
    # randomised around the fraction: from a 1-token prefix to twice the nominal one, roughly uniform
    nominal = L - round(L * rate)
    assert prefix.min() == 1 and prefix.max() == 2 * nominal - 1
    hist = np.bincount(prefix, minlength=2 * nominal)[1:]
    assert hist.min() > 0.5 * hist.mean() and hist.max() < 1.5 * hist.mean()


def test_mixture_frequencies_and_curriculum():
    u = ul2.UL2(32, 32)
    w = text_windows(np.random.default_rng(4), 200_000, u.window_len)
    freq = np.bincount(u.make_batch(w, step=0)["denoiser"], minlength=5) / len(w)
    np.testing.assert_allclose(freq, np.array([1, 1, 1, 1, 4]) / 8, rtol=0.03)

    end = [4, 1, 1, 1, 1]
    c = ul2.UL2(32, 32, end_mixture=end, curriculum_iters=1000)
    start, stop = np.array([1, 1, 1, 1, 4]) / 8, np.array(end) / 8
    np.testing.assert_allclose(c.weights_at(0), start)
    np.testing.assert_allclose(c.weights_at(250), 0.75 * start + 0.25 * stop)
    np.testing.assert_allclose(c.weights_at(1000), stop)
    np.testing.assert_allclose(c.weights_at(5000), stop)
    freq = np.bincount(c.make_batch(w, step=500)["denoiser"], minlength=5) / len(w)
    np.testing.assert_allclose(freq, 0.5 * start + 0.5 * stop, rtol=0.03)
    # the full-mixture form of end_mixture means the same thing
    full = ul2.UL2(32, 32, end_mixture=[d[:3] + (x,) for d, x in zip(ul2.DEFAULT_MIXTURE, end)], curriculum_iters=1000)
    np.testing.assert_allclose(full.weights_at(500), c.weights_at(500))


# --- layout, padding, ids -----------------------------------------------------------------------

def test_layout_and_padding():
    u = ul2.UL2(160, 128)
    w = text_windows(np.random.default_rng(6), 500, u.window_len)
    b = u.make_batch(w, step=11, rank=2)
    B = len(w)
    assert b["enc_ids"].shape == (B, 160) and b["enc_mask"].shape == (B, 160)
    assert b["dec_ids"].shape == (B, 128) and b["labels"].shape == (B, 128) and b["denoiser"].shape == (B,)
    assert b["enc_ids"].dtype == np.int64 and b["labels"].dtype == np.int64 and b["dec_ids"].dtype == np.int64
    assert b["enc_mask"].dtype == bool and b["denoiser"].dtype == np.int64
    # mode token first, and nowhere else
    kinds = np.array([MODE_IDS[ul2.DEFAULT_MIXTURE[d][0]] for d in b["denoiser"]])
    assert (b["enc_ids"][:, 0] == kinds).all()
    mode = np.isin(b["enc_ids"], list(MODE_IDS.values()))
    assert mode[:, 1:].sum() == 0 and not np.isin(b["labels"], list(MODE_IDS.values())).any()
    # enc mask is a prefix of real tokens; pads are PAD_ID
    n_enc = b["enc_mask"].sum(1)
    assert (b["enc_mask"] == (np.arange(160) < n_enc[:, None])).all()
    assert (b["enc_ids"][~b["enc_mask"]] == PAD_ID).all()
    # labels end with EOS, then only the ignore index
    n_lab = label_lengths(b["labels"])
    assert (b["labels"][np.arange(B), n_lab - 1] == EOS_ID).all()
    assert ((b["labels"] == IGNORE_INDEX) == (np.arange(128) >= n_lab[:, None])).all()
    # decoder input: start token, then labels shifted right, pads as PAD_ID
    assert (b["dec_ids"][:, 0] == DECODER_START_ID).all()
    shifted = np.where(b["labels"][:, :-1] == IGNORE_INDEX, PAD_ID, b["labels"][:, :-1])
    assert (b["dec_ids"][:, 1:] == shifted).all()


def test_rejects_mode_and_sentinel_ids_in_text():
    u = ul2.UL2(64, 64)
    for bad in (MODE_IDS["X"], SENTINEL_START + 5, 151700, -1):
        w = text_windows(np.random.default_rng(7), 4, u.window_len)
        w[2, 9] = bad
        with pytest.raises(ValueError, match="ids outside text"):
            u.make_batch(w, step=0)


def test_deterministic_in_seed_rank_step():
    u = ul2.UL2(128, 128, seed=3)
    w = text_windows(np.random.default_rng(8), 64, u.window_len)
    a = u.make_batch(w, step=5, rank=1)
    same = ul2.UL2(128, 128, seed=3).make_batch(w, step=5, rank=1)
    for key in a:
        np.testing.assert_array_equal(a[key], same[key])
    for other in (u.make_batch(w, step=5, rank=0), u.make_batch(w, step=6, rank=1),
                  ul2.UL2(128, 128, seed=4).make_batch(w, step=5, rank=1)):
        assert not np.array_equal(a["enc_ids"], other["enc_ids"])


def test_denoiser_names():
    assert ul2.UL2(64, 64).denoiser_names == ["R(3,0.15)", "R(12,0.5)", "X(32,0.15)", "X(32,0.5)", "S(0.75)"]


# ---------------------------------------------------------------------------------------
# packing

def packed(enc_len=512, dec_len=512, rows=128, seed=0, step=0, first=0, u=None):
    u = u or ul2.UL2(enc_len, dec_len)
    windows = text_windows(np.random.default_rng(seed), rows, enc_len + dec_len)
    return u, windows, u.make_packed(windows, step, range(first, first + rows))


def test_packed_segments_reconstruct_consecutive_text():
    """Every example of a packed row is a valid UL2 example of the next stretch of the row's window."""
    u, windows, b = packed(256, 192, rows=24)
    for i in range(len(windows)):
        used = 0
        for k in range(1, int(b["enc_seg"][i].max()) + 1):
            e, d = b["enc_seg"][i] == k, b["dec_seg"][i] == k
            enc, labels, dec = b["enc_ids"][i][e], b["labels"][i][d], b["dec_ids"][i][d]
            assert enc[0] in MODE_IDS.values() and labels[-1] == EOS_ID
            assert dec[0] == DECODER_START_ID and np.array_equal(dec[1:], labels[:-1])  # restarts per segment
            src = ul2.reconstruct(enc, np.ones(len(enc), bool), labels)
            assert np.array_equal(src, windows[i][used:used + len(src)])
            den = b["denoiser"][i][d]
            assert (den == den[0]).all() and MODE_IDS[u.mixture[den[0]][0]] == enc[0]
            used += len(src)
        # segments are contiguous and numbered in order, padding only at the end of a row
        for seg in (b["enc_seg"][i], b["dec_seg"][i]):
            real = seg[seg > 0]
            assert (np.diff(real) >= 0).all() and (seg[len(real):] == 0).all()
        pad = b["labels"][i] == IGNORE_INDEX
        assert (pad == (b["dec_seg"][i] == 0)).all() and (b["enc_ids"][i][b["enc_seg"][i] == 0] == PAD_ID).all()


@pytest.mark.parametrize("sizes", [(512, 512), (256, 256)])
def test_packing_fills_rows_and_keeps_the_mixture(sizes):
    """>= 90 % of positions are real tokens (unpacked: ~51 %), and the denoisers keep their mixture weights
    per example (1/8 each, S 1/2) within sampling error."""
    u, _, b = packed(*sizes, rows=256)
    enc_len, dec_len = sizes
    fill = ((b["enc_seg"] > 0).sum() + (b["dec_seg"] > 0).sum()) / (len(b["enc_seg"]) * (enc_len + dec_len))
    assert fill >= 0.90, fill
    counts = np.zeros(len(u.mixture))
    for i in range(len(b["dec_seg"])):
        for k in range(1, int(b["dec_seg"][i].max()) + 1):
            counts[b["denoiser"][i][b["dec_seg"][i] == k][0]] += 1
    share, want = counts / counts.sum(), u.weights_at(0)
    sigma = np.sqrt(want * (1 - want) / counts.sum())
    assert (np.abs(share - want) < 4 * sigma + 0.01).all(), (share, want)


def test_packed_rows_depend_only_on_their_index():
    """Row r is the same whether it is built alone, in a batch, or in another split of the batch."""
    u = ul2.UL2(128, 96)
    windows = text_windows(np.random.default_rng(5), 6, 224)
    whole = u.make_packed(windows, 3, range(10, 16))
    halves = [u.make_packed(windows[:2], 3, range(10, 12)), u.make_packed(windows[2:], 3, range(12, 16))]
    for k in whole:
        assert np.array_equal(whole[k], np.concatenate([h[k] for h in halves]))
    assert not np.array_equal(u.make_packed(windows, 3, range(20, 26))["enc_ids"], whole["enc_ids"])
