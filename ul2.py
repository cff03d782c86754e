"""UL2 mixture of denoisers: windows of token ids -> (encoder input, decoder target) batches.

R and X denoisers are T5 span corruption (they differ only in their mode token and in the
spans and rates the mixture gives them); S is a prefix LM. Every encoder input starts with
the denoiser's mode token (tokenizer.MODE_IDS), so the model knows which task it is doing.

Span corruption of a window of L tokens with rate r and mean span m, as T5's
random_spans_noise_mask: exactly n = round(L*r) noise tokens cut into k spans, the span
lengths (and the lengths of the k non-noise spans between them) drawn as a uniformly random
segmentation, noise and non-noise spans alternating. Two departures from T5, both cheap:
  - k is n/m rounded *stochastically* (floor or ceil with the fractional part as the odds),
    so the mean span length is m even when n/m is small: X(32, 0.15) at L = 512 has n/m = 2.4;
    plain rounding would always use 2 spans, a mean span of 38.5 instead of 32.
  - half the masks are mirrored, because T5's always ends the window with a noise span (and
    never starts with one); the model should not learn that.
Each noise span becomes one sentinel (<extra_id_0>, <extra_id_1>, ... in order) in the
encoder input; the target is sentinel_0 span_0 sentinel_1 span_1 ... EOS.

Prefix LM (S) with target fraction r: the split is randomised, not fixed. The prefix length
is uniform over an interval centred on L - round(L*r) (from 1 token up to twice the nominal
prefix when r > 0.5), so on average r of the window is target, yet the model sees prompts of
every length: at inference (sample.py) a prompt can be any length, and a fixed split would
teach the decoder that the encoder always holds exactly the same number of tokens.

Everything is vectorised over the batch: a Python loop runs only over the few (denoiser,
span count) groups of a batch, never over tokens. Batches are deterministic in
(seed, rank, step).
"""
import math

import numpy as np

from tokenizer import DECODER_START_ID, EOS_ID, IGNORE_INDEX, MODE_IDS, NUM_SENTINELS, PAD_ID, SENTINEL_START

# (kind, mean_span, rate, weight); for S, rate is the target fraction and mean_span is unused
DEFAULT_MIXTURE = [
    ("R", 3, 0.15, 1),
    ("R", 12, 0.5, 1),
    ("X", 32, 0.15, 1),
    ("X", 32, 0.5, 1),
    ("S", None, 0.75, 4),
]
# the tokenizer emits no id at or above the first mode token: mode, unused and sentinel rows
FIRST_NON_TEXT_ID = min(MODE_IDS.values())


def denoiser_name(kind, mean_span, rate):
    return f"S({rate:g})" if kind == "S" else f"{kind}({mean_span:g},{rate:g})"


def check_mixture(mixture, what="mixture"):
    """Return the mixture as a list of (kind, mean_span, rate, weight), or raise a one-line error."""
    out = []
    for entry in mixture:
        if len(entry) != 4:
            raise ValueError(f"ul2.py: {what} entry {entry!r} must be (kind, mean_span, rate, weight)")
        kind, span, rate, weight = entry
        if kind not in MODE_IDS:
            raise ValueError(f"ul2.py: {what} entry {entry!r}: kind must be one of {sorted(MODE_IDS)}")
        if not 0 < rate < 1:
            raise ValueError(f"ul2.py: {what} entry {entry!r}: rate must lie strictly between 0 and 1")
        if kind != "S" and not (span is not None and span >= 1):
            raise ValueError(f"ul2.py: {what} entry {entry!r}: mean_span must be >= 1")
        if not weight >= 0:
            raise ValueError(f"ul2.py: {what} entry {entry!r}: weight must be >= 0")
        out.append((kind, None if kind == "S" else float(span), float(rate), float(weight)))
    if not out or sum(e[3] for e in out) <= 0:
        raise ValueError(f"ul2.py: {what} needs at least one denoiser with a positive weight")
    return out


def span_counts(length, mean_span, rate):
    """Noise tokens n, and the two span counts k the stochastic rounding picks from, with the odds of the larger."""
    n = min(max(round(length * rate), 1), length - 1)
    x = n / mean_span
    lo, hi = max(math.floor(x), 1), max(math.ceil(x), 1)
    return n, lo, hi, (x - math.floor(x) if x >= 1 else 0.0)


def prefix_range(length, rate):
    """Smallest and largest prefix length of the S denoiser; their mean is length - round(length*rate)."""
    prefix = length - min(max(round(length * rate), 1), length - 1)
    half = min(prefix - 1, length - prefix - 1)
    return prefix - half, prefix + half


def max_lengths(length, kind, mean_span, rate):
    """Longest encoder input (mode token included) and target (EOS included) a denoiser makes of a window."""
    if kind == "S":
        lo, hi = prefix_range(length, rate)
        return 1 + hi, length - lo + 1
    n, _, k, _ = span_counts(length, mean_span, rate)
    # noise tokens leave the input (k sentinels stand in for them) and move to the target
    return 1 + length - n + k, n + k + 1


def segmentation(rng, rows, total, parts):
    """[rows, parts] positive lengths summing to total, each composition equally likely."""
    if parts == 1:
        return np.full((rows, 1), total, dtype=np.int64)
    # the parts-1 cut points are a uniformly random subset of the total-1 gaps between tokens
    cuts = rng.random((rows, total - 1)).argpartition(parts - 2, axis=1)[:, : parts - 1] + 1
    cuts.sort(axis=1)
    edges = np.concatenate([np.zeros((rows, 1), np.int64), cuts, np.full((rows, 1), total, np.int64)], axis=1)
    return np.diff(edges, axis=1)


def random_spans_noise_mask(rng, rows, length, num_noise, num_spans):
    """[rows, length] bool: num_noise noise tokens in num_spans spans, alternating with non-noise spans."""
    noise = segmentation(rng, rows, num_noise, num_spans)
    clean = segmentation(rng, rows, length - num_noise, num_spans)
    starts = np.stack([clean, noise], axis=2).reshape(rows, 2 * num_spans).cumsum(axis=1)[:, :-1]
    flips = np.zeros((rows, length), np.int32)
    np.put_along_axis(flips, starts, 1, axis=1)
    mask = (flips.cumsum(axis=1) & 1).astype(bool)  # odd-numbered spans are noise
    mirror = rng.random(rows) < 0.5
    mask[mirror] = mask[mirror, ::-1]
    return mask


def span_corruption(windows, mask):
    """Encoder body (sentinels for spans) and target (sentinel, span, sentinel, span, ...) for rows
    that share their noise and span counts, so both come out as rectangular arrays."""
    rows, length = windows.shape
    first = mask.copy()
    first[:, 1:] &= ~mask[:, :-1]
    sentinel = SENTINEL_START - 1 + first.cumsum(axis=1)
    num_spans = int(first[0].sum())
    num_noise = int(mask[0].sum())
    keep = ~mask | first
    body = np.where(first, sentinel, windows)[keep].reshape(rows, length - num_noise + num_spans)
    # two slots per source token: its sentinel if it opens a span, then the token if it is noise
    slots = np.stack([sentinel, windows], axis=2)
    target = slots[np.stack([first, mask], axis=2)].reshape(rows, num_noise + num_spans)
    return body, target


def reconstruct(enc_ids, enc_mask, labels):
    """Merge one example's encoder input and target back into the source window (plain Python,
    independent of the vectorised path; used by tests and to show infilling results)."""
    enc = [int(t) for t in np.asarray(enc_ids)[np.asarray(enc_mask, bool)]]
    tgt = [int(t) for t in np.asarray(labels) if t != IGNORE_INDEX]
    if enc and enc[0] in MODE_IDS.values():
        enc = enc[1:]
    if not tgt or tgt[-1] != EOS_ID:
        raise ValueError("ul2.reconstruct: target must end with EOS")
    is_sentinel = lambda t: SENTINEL_START <= t < SENTINEL_START + NUM_SENTINELS
    spans, current, continuation = {}, None, []
    for t in tgt[:-1]:
        if is_sentinel(t):
            current = spans.setdefault(t, [])
        elif current is None:
            continuation.append(t)  # prefix LM: the target continues the input
        else:
            current.append(t)
    out = []
    for t in enc:
        if is_sentinel(t):
            if t not in spans:
                raise ValueError(f"ul2.reconstruct: <extra_id_{t - SENTINEL_START}> has no span in the target")
            out.extend(spans.pop(t))
        else:
            out.append(t)
    if spans:
        raise ValueError(f"ul2.reconstruct: target spans {sorted(s - SENTINEL_START for s in spans)} are not in the input")
    return np.array(out + continuation, dtype=np.int64)


class UL2:
    def __init__(self, enc_len, dec_len, mixture=DEFAULT_MIXTURE, end_mixture=None, curriculum_iters=0, seed=0):
        self.enc_len, self.dec_len, self.seed = int(enc_len), int(dec_len), int(seed)
        self.mixture = check_mixture(mixture)
        self.denoiser_names = [denoiser_name(*d[:3]) for d in self.mixture]
        self.start_weights = np.array([d[3] for d in self.mixture])
        self.start_weights /= self.start_weights.sum()
        self.end_weights = self.start_weights
        self.curriculum_iters = int(curriculum_iters)
        if end_mixture is not None:
            if self.curriculum_iters <= 0:
                raise ValueError("ul2.py: end_mixture needs curriculum_iters > 0 (the steps over which weights move)")
            # the curriculum moves weights only: the same denoisers with new weights, or bare weights
            if len(end_mixture) != len(self.mixture):
                raise ValueError(f"ul2.py: end_mixture has {len(end_mixture)} entries, mixture has {len(self.mixture)}")
            if all(np.isscalar(e) for e in end_mixture):
                end_mixture = [d[:3] + (w,) for d, w in zip(self.mixture, end_mixture)]
            end = check_mixture(end_mixture, "end_mixture")
            if [d[:3] for d in end] != [d[:3] for d in self.mixture]:
                raise ValueError("ul2.py: end_mixture must list the same denoisers as mixture, in the same order")
            self.end_weights = np.array([d[3] for d in end]) / sum(d[3] for d in end)
        self.window_len = self.fit_window()

    def fit_window(self):
        """Longest window from which every denoiser's input fits enc_len and its target fits dec_len.
        Span corruption moves noise tokens from input to target and adds a sentinel per span, so the
        window is longer than either side (as T5's compute_input_and_target_lengths finds)."""
        best = 0
        for length in range(2, self.enc_len + self.dec_len + 1):
            if all(e <= self.enc_len and d <= self.dec_len for e, d in (max_lengths(length, *m[:3]) for m in self.mixture)):
                best = length
        if best == 0:
            raise ValueError(f"ul2.py: enc_len={self.enc_len}, dec_len={self.dec_len} are too short for the mixture")
        for (kind, span, rate, _), name in zip(self.mixture, self.denoiser_names):
            if kind != "S" and span_counts(best, span, rate)[2] > NUM_SENTINELS:
                raise ValueError(f"ul2.py: {name} needs {span_counts(best, span, rate)[2]} sentinels at window {best} "
                                 f"but only {NUM_SENTINELS} exist; raise its mean_span or lower enc_len/dec_len")
        return best

    def weights_at(self, step):
        """Mixture weights (summing to 1) at a training step: linear from mixture to end_mixture."""
        if self.curriculum_iters <= 0:
            return self.start_weights.copy()
        t = min(max(step / self.curriculum_iters, 0.0), 1.0)
        return (1 - t) * self.start_weights + t * self.end_weights

    def make_batch(self, windows, step, rank=0):
        windows = np.asarray(windows)
        if windows.ndim != 2 or windows.shape[1] != self.window_len:
            raise ValueError(f"ul2.make_batch: windows must be [batch, {self.window_len}], got {list(windows.shape)}")
        if windows.size and (windows.min() < 0 or windows.max() >= FIRST_NON_TEXT_ID):
            raise ValueError(f"ul2.make_batch: windows hold ids outside text (0..{FIRST_NON_TEXT_ID - 1}); "
                             "mode/sentinel ids must not come from the data, regenerate the shards with tokenizer.py")
        windows = windows.astype(np.int64)
        batch, length = windows.shape
        rng = np.random.default_rng([self.seed, rank, step])
        denoiser = rng.choice(len(self.mixture), size=batch, p=self.weights_at(step))
        enc_ids = np.full((batch, self.enc_len), PAD_ID, np.int64)
        enc_lens = np.zeros(batch, np.int64)
        labels = np.full((batch, self.dec_len), IGNORE_INDEX, np.int64)

        for d, (kind, span, rate, _) in enumerate(self.mixture):
            rows = np.flatnonzero(denoiser == d)
            if rows.size == 0:
                continue
            enc_ids[rows, 0] = MODE_IDS[kind]
            if kind == "S":
                lo, hi = prefix_range(length, rate)
                prefix = rng.integers(lo, hi + 1, size=rows.size)
                cols = np.arange(hi)
                enc_ids[rows, 1 : 1 + hi] = np.where(cols < prefix[:, None], windows[rows, :hi], PAD_ID)
                enc_lens[rows] = 1 + prefix
                src = prefix[:, None] + np.arange(self.dec_len)
                tgt = np.take_along_axis(windows[rows], np.minimum(src, length - 1), axis=1)
                labels[rows] = np.where(src < length, tgt, IGNORE_INDEX)
                labels[rows, length - prefix] = EOS_ID
                continue
            n, k_lo, k_hi, p_hi = span_counts(length, span, rate)
            num_spans = np.where(rng.random(rows.size) < p_hi, k_hi, k_lo)
            for k in (k_lo, k_hi) if k_hi != k_lo else (k_lo,):
                sub = rows[num_spans == k]
                if sub.size == 0:
                    continue
                body, target = span_corruption(windows[sub], random_spans_noise_mask(rng, sub.size, length, n, k))
                enc_ids[sub, 1 : 1 + body.shape[1]] = body
                enc_lens[sub] = 1 + body.shape[1]
                labels[sub, : target.shape[1]] = target
                labels[sub, target.shape[1]] = EOS_ID

        enc_mask = np.arange(self.enc_len) < enc_lens[:, None]
        dec_ids = np.empty_like(labels)
        dec_ids[:, 0] = DECODER_START_ID
        dec_ids[:, 1:] = np.where(labels[:, :-1] == IGNORE_INDEX, PAD_ID, labels[:, :-1])
        return {"enc_ids": enc_ids, "enc_mask": enc_mask, "dec_ids": dec_ids, "labels": labels,
                "denoiser": denoiser.astype(np.int64)}
