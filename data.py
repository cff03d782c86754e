"""Training data plumbing shared by the objectives: token shards -> random disjoint windows, and a
background thread that builds the coming micro-batches while the model trains.

The objectives (ul2.py, causal.py, diffusion.py, contrastive.py) turn windows or text into batches;
train.py only asks them for rows by a global row index, so the data position is one integer.
"""
import queue
import threading

import numpy as np

from shards import ShardDataset
from tokenizer import NUM_SENTINELS


class DataError(ValueError):
    """Bad data or data config: train.py prints the one-line message and exits."""


def open_shards(c, model_cfg, split, with_sentinels):
    """The shard dataset of one split, checked against the model's vocabulary.

    The tokenizer's vocabulary is Qwen3's plus the sentinels; a decoder-only model (with_sentinels False)
    has no sentinel rows, so its vocabulary is that much smaller than the shards' meta says."""
    data = ShardDataset(c.data_dir, split, vocab_size=model_cfg.vocab_size)
    data_vocab = data.meta.get("vocab_size")
    model_vocab = model_cfg.vocab_size + (0 if with_sentinels else NUM_SENTINELS)
    if data_vocab != model_vocab:
        raise DataError(f"{c.data_dir}/meta.json: vocab_size {data_vocab} does not match the model's {model_vocab}"
                        f"{'' if with_sentinels else ' (with sentinels)'}; prepare the shards with this project's "
                        "tokenizer or pick a model with that vocabulary")
    return data


class WindowSampler:
    """Example k of the run -> a window of `length` tokens.

    Each epoch cuts every shard into non-overlapping slots at a random phase and visits the
    slots in a random order, so no two examples of an epoch overlap, whichever process draws
    them, and the data position is one integer (the examples drawn so far)."""

    def __init__(self, data, length, seed, what):
        self.data, self.length, self.seed = data, length, seed
        # one slot of slack per shard leaves room for the random phase
        counts = [max(len(s) // length - 1, 0) for s in data.shards]
        self.first_slot = np.cumsum([0] + counts)
        self.num_slots = int(self.first_slot[-1])
        if self.num_slots == 0:
            raise DataError(f"{what}: too few tokens for even one window of {length} (shards of "
                       f"{[len(s) for s in data.shards]} tokens); use more data or shorter enc_len/dec_len")
        self.epoch, self.phase, self.order = -1, 0, None

    def windows(self, first, n):
        out = np.empty((n, self.length), np.int64)
        for i, k in enumerate(range(first, first + n)):
            epoch, j = divmod(k, self.num_slots)
            if epoch != self.epoch:
                rng = np.random.default_rng([self.seed, epoch])
                self.epoch, self.phase, self.order = epoch, int(rng.integers(self.length)), rng.permutation(self.num_slots)
            slot = int(self.order[j])
            shard = int(np.searchsorted(self.first_slot, slot, side="right")) - 1
            start = self.phase + (slot - int(self.first_slot[shard])) * self.length
            out[i] = self.data.window(shard, start, self.length)
        return out


class Prefetcher:
    """Calls make(it, micro) for the coming micro-steps on a background thread (numpy releases
    the GIL for most of the work), so the training step never waits for its batch."""

    def __init__(self, make, first_iter, micro_steps, depth):
        self.queue, self.stop = queue.Queue(maxsize=max(depth, 1)), threading.Event()
        self.thread = threading.Thread(target=self._run, args=(make, first_iter, micro_steps), daemon=True)
        self.thread.start()

    def _run(self, make, it, micro_steps):
        try:
            while not self.stop.is_set():
                for a in range(micro_steps):
                    item = make(it, a)
                    while not self.stop.is_set():
                        try:
                            self.queue.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            pass
                it += 1
        except BaseException as e:  # hand the error to the training loop
            self.queue.put(e)

    def next(self):
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)


