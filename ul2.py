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
MIN_EXAMPLE = 16  # shortest source text a packed example is cut to; shorter draws are skipped


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
        # encoder and target tokens per source token of each denoiser's typical example (packing plans with them)
        self.shares = []
        for kind, span, rate, _ in self.mixture:
            e, d = max_lengths(self.window_len, kind, span, rate)
            if kind == "S":
                prefix = sum(prefix_range(self.window_len, rate)) // 2
                e, d = 1 + prefix, self.window_len - prefix + 1
            self.shares.append((e / self.window_len, d / self.window_len))

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
        """One example per row, padded: windows [B, window_len] -> enc/dec arrays (see INTERFACES.md).
        Validation uses these: every row is one denoiser, so losses split per denoiser."""
        windows = self._check(windows)
        if windows.shape[1] != self.window_len:
            raise ValueError(f"ul2.make_batch: windows must be [batch, {self.window_len}], got {list(windows.shape)}")
        rng = np.random.default_rng([self.seed, rank, step])
        denoiser = rng.choice(len(self.mixture), size=len(windows), p=self.weights_at(step))
        enc_ids, enc_lens, labels = self._corrupt(windows, denoiser, rng)
        enc_mask = np.arange(self.enc_len) < enc_lens[:, None]
        return {"enc_ids": enc_ids, "enc_mask": enc_mask, "dec_ids": decoder_input(labels), "labels": labels,
                "denoiser": denoiser.astype(np.int64)}

    def make_packed(self, windows, step, rows):
        """Several examples per row, so nearly every computed position is a real token.

        windows [n, enc_len + dec_len]: one window of source text per row (rows = the global indices of the
        rows, which seed them: the same rows come out however a global batch is split). Each row is filled
        from its window's text, front to back, with examples whose denoisers are drawn from the mixture in
        order; each example takes up to window_len source tokens (every source token lands in the input or
        the target, so the window always suffices). An R/X example is cut to leave the room in the
        proportions of the next more decoder-heavy draw (_partner, _plan), and an S example draws its split
        from the part of its usual range that fits, aimed the same way: a row mixes encoder-heavy (R, X at
        low rates) and decoder-heavy (S) examples until both sides are full. A draw that cannot fit even
        MIN_EXAMPLE tokens is skipped (rare: the mixture per example stays as drawn).

        Returns enc_ids, enc_seg, dec_ids, dec_seg, labels ([n, enc_len] / [n, dec_len]; seg 0 = padding,
        k = the k-th example of the row) and denoiser [n, dec_len] (the denoiser of each target token, -1 on
        padding), so per-denoiser token counts stay measurable."""
        windows = self._check(windows)
        n = len(windows)
        enc_ids = np.full((n, self.enc_len), PAD_ID, np.int64)
        enc_seg = np.zeros((n, self.enc_len), np.int64)
        labels = np.full((n, self.dec_len), IGNORE_INDEX, np.int64)
        dec_seg = np.zeros((n, self.dec_len), np.int64)
        denoiser = np.full((n, self.dec_len), -1, np.int64)
        weights = self.weights_at(step)
        max_draws = (self.enc_len + self.dec_len) // MIN_EXAMPLE + 1
        for i, row in enumerate(rows):
            rng = np.random.default_rng([self.seed, int(row), 1])
            draws = rng.choice(len(self.mixture), size=max_draws, p=weights)
            e = d = used = k = 0
            for j, den in enumerate(draws):
                room = (self.enc_len - e, self.dec_len - d, windows.shape[1] - used)
                if self.mixture[den][0] == "S":
                    # the split of a prefix-LM example is random anyway; in a packed row it is drawn from the
                    # part of its usual range that fits, centred where it leaves the room in the proportions
                    # the next draw uses: S examples, half the mixture, are what balances the two sides
                    length, bounds = self._fit_prefix_lm(den, *room)
                    if length < MIN_EXAMPLE:
                        continue
                    a, b = self.shares[draws[j + 1] if j + 1 < len(draws) else den]
                    aim = ((room[0] - 1) * b - (room[1] - length - 1) * a) / (a + b)
                    spread = max((bounds[1] - bounds[0]) // 8, 0)
                    centre = int(min(max(aim, bounds[0] + spread), bounds[1] - spread))
                    bounds = (centre - spread, centre + spread)
                    ids, lens, lab = self._corrupt(windows[i:i + 1, used:used + length], np.array([den]), rng, bounds)
                    enc, tgt = ids[0, :lens[0]], lab[0][lab[0] != IGNORE_INDEX]
                else:
                    plan = self._plan(den, self._partner(den, draws[j + 1:]), room)
                    length = min(plan, self._fit(den, *room))
                    if length < MIN_EXAMPLE:
                        continue
                    ids, lens, lab = self._corrupt(windows[i:i + 1, used:used + length], np.array([den]), rng)
                    enc, tgt = ids[0, :lens[0]], lab[0][lab[0] != IGNORE_INDEX]
                k += 1
                enc_ids[i, e:e + len(enc)], enc_seg[i, e:e + len(enc)] = enc, k
                labels[i, d:d + len(tgt)], dec_seg[i, d:d + len(tgt)], denoiser[i, d:d + len(tgt)] = tgt, k, den
                e, d, used = e + len(enc), d + len(tgt), used + length
                if min(self.enc_len - e, self.dec_len - d) < 4:
                    break
        return {"enc_ids": enc_ids, "enc_seg": enc_seg, "dec_ids": decoder_input(labels, dec_seg), "dec_seg": dec_seg,
                "labels": labels, "denoiser": denoiser}

    def _partner(self, den, upcoming):
        """The draw this example leaves room for: the first upcoming one that is more decoder-heavy (so two
        encoder-heavy draws in a row do not fill the encoder side and strand the decoder side), else the next."""
        a, b = self.shares[den]
        for d in upcoming:
            if self.shares[d][1] * a > b * self.shares[d][0]:
                return d
        return upcoming[0] if len(upcoming) else den

    def _plan(self, den, next_den, room):
        """Source length for this example that leaves the room in the proportions the next example uses,
        so that the next one can fill both sides (a two-example plan; no draw is skipped or reordered)."""
        (a1, b1), (a2, b2) = self.shares[den], self.shares[next_den]
        det = a1 * b2 - b1 * a2
        if abs(det) < 1e-9:
            return self.window_len
        length = (room[0] * b2 - room[1] * a2) / det
        # length <= 0: this example would move the room away from the partner's proportions, so keep it short
        return max(int(length), MIN_EXAMPLE)

    def _fit_prefix_lm(self, den, enc_room, dec_room, text_left):
        """Longest source length of an S example for which some split of its usual range fits the room
        (input 1 + prefix <= enc_room, target length - prefix + 1 <= dec_room), and that split range."""
        rate = self.mixture[den][2]
        for length in range(min(self.window_len, text_left, enc_room + dec_room - 2), MIN_EXAMPLE - 1, -1):
            lo, hi = prefix_range(length, rate)
            lo, hi = max(lo, length + 1 - dec_room), min(hi, enc_room - 1)
            if lo <= hi:
                return length, (lo, hi)
        return 0, None

    def _fit(self, den, enc_room, dec_room, text_left):
        """Longest source length (<= window_len, <= the text left) whose worst case fits the room left."""
        kind, span, rate, _ = self.mixture[den]
        lo, hi = 0, min(self.window_len, text_left)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            e, d = max_lengths(mid, kind, span, rate) if mid >= 2 else (mid + 1, mid + 1)
            if e <= enc_room and d <= dec_room:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _check(self, windows):
        windows = np.asarray(windows)
        if windows.ndim != 2:
            raise ValueError(f"ul2: windows must be [batch, length], got {list(windows.shape)}")
        if windows.size and (windows.min() < 0 or windows.max() >= FIRST_NON_TEXT_ID):
            raise ValueError(f"ul2: windows hold ids outside text (0..{FIRST_NON_TEXT_ID - 1}); "
                             "mode/sentinel ids must not come from the data, regenerate the shards with tokenizer.py")
        return windows.astype(np.int64)

    def _corrupt(self, windows, denoiser, rng, prefix_bounds=None):
        """Encoder inputs (mode token first, padded to enc_len), their lengths, and targets (EOS last, padded
        with IGNORE_INDEX to dec_len) for windows [B, L] under the given denoisers."""
        batch, length = windows.shape
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
                if prefix_bounds is not None:  # a packed row's room narrows the split's range
                    lo, hi = max(lo, prefix_bounds[0]), min(hi, prefix_bounds[1])
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
        return enc_ids, enc_lens, labels


def decoder_input(labels, dec_seg=None):
    """The decoder reads DECODER_START_ID, then the target shifted right, restarting in every segment."""
    dec_ids = np.empty_like(labels)
    dec_ids[:, 0] = DECODER_START_ID
    dec_ids[:, 1:] = np.where(labels[:, :-1] == IGNORE_INDEX, PAD_ID, labels[:, :-1])
    if dec_seg is not None:
        starts = np.zeros_like(dec_seg, dtype=bool)
        starts[:, 1:] = (dec_seg[:, 1:] != dec_seg[:, :-1]) & (dec_seg[:, 1:] > 0)
        dec_ids[starts] = DECODER_START_ID
    return dec_ids


# ---------------------------------------------------------------------------------------
# the training objective (train.py's interface: see INTERFACES.md)

CONFIG = {
    "ul2_mixture": list(DEFAULT_MIXTURE),  # (kind, mean_span, rate, weight) per denoiser
    "ul2_end_mixture": [],                 # []: fixed mixture; else the weights reached after ul2_curriculum_iters
    "ul2_curriculum_iters": 0,
}


class Objective:
    """UL2 on the encoder-decoder: rows of token windows -> packed (or one-example) rows -> summed CE."""
    model_type = "encdec"
    id_keys = ("enc_ids", "dec_ids", "labels")

    def __init__(self, c, model_cfg, rank=0, world=1):
        from data import WindowSampler, open_shards
        from vocab_trim import objective_ids
        self.ul2 = UL2(c.enc_len, c.dec_len, c.ul2_mixture, c.ul2_end_mixture or None, c.ul2_curriculum_iters,
                       seed=c.seed)
        self.fixed = UL2(c.enc_len, c.dec_len, self.ul2.mixture, seed=0)  # validation: the same batches every time
        self.pack, self.groups = c.pack, self.ul2.denoiser_names
        self.extra_ids = objective_ids(encoder_decoder=True)
        train = open_shards(c, model_cfg, "train", with_sentinels=True)
        val = open_shards(c, model_cfg, "val", with_sentinels=True) if c.eval_interval or c.trim_vocab else None
        self.shard_sets = [s for s in (train, val) if s is not None]
        # a packed row is cut from one window of enc_len + dec_len tokens (each source token lands on one side)
        self.sampler = WindowSampler(train, c.enc_len + c.dec_len if self.pack else self.ul2.window_len, c.seed,
                                     f"{c.data_dir} train split")
        self.val_sampler = WindowSampler(val, self.ul2.window_len, 0, f"{c.data_dir} val split") if val else None

    def train_batch(self, step, first, rows):
        windows = self.sampler.windows(first, rows)
        if self.pack:
            return self.ul2.make_packed(windows, step, range(first, first + rows))
        # one example per row, each row seeded by its own index: the same rows however the batch is split
        parts = [self.ul2.make_batch(windows[i:i + 1], step, rank=first + i) for i in range(rows)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def eval_batch(self, index, rows):
        if self.val_sampler is None:
            return None
        b = self.fixed.make_batch(self.val_sampler.windows(index * rows, rows), step=index)
        b["group"] = b.pop("denoiser")
        return b

    def real_tokens(self, b):
        """(encoder tokens, decoder tokens, examples) that are not padding."""
        if "enc_seg" in b:
            return int((b["enc_seg"] > 0).sum()), int((b["dec_seg"] > 0).sum()), int(b["enc_seg"].max(1).sum())
        return int(b["enc_mask"].sum()), int((b["labels"] != IGNORE_INDEX).sum()), len(b["labels"])

    def loss(self, model, b):
        _, loss_sum = model(b["enc_ids"], b.get("enc_mask"), b["dec_ids"], labels=b["labels"],
                            enc_seg=b.get("enc_seg"), dec_seg=b.get("dec_seg"), reduction="sum")
        return loss_sum, (b["labels"] != IGNORE_INDEX).sum()
