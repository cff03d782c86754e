"""Next-token pretraining of a decoder-only Qwen3 (the laptop recipe's stand-in for Qwen3-0.6B).

Windows of dec_len + 1 tokens from the shards: the model reads the first dec_len and predicts the
next token at every position. Packed (the default), the documents of a window are segments: a
document sees only itself and its positions start at 0, as each document would in its own row.
<|endoftext|> opens each document (it is what Qwen3 saw before every document, and the decoder's
start token), so the token that ends a document predicts the end of text from that document alone.
"""
import numpy as np

from tokenizer import EOS_ID

CONFIG = {}


def document_segments(idx):
    """Segment ids [B, T] (1, 2, ...): a new segment starts at every <|endoftext|>."""
    return 1 + np.cumsum(idx == EOS_ID, axis=1) - (idx[:, :1] == EOS_ID)


class Objective:
    model_type = "decoder"
    id_keys = ("idx", "labels")

    def __init__(self, c, model_cfg, rank=0, world=1):
        from data import WindowSampler, open_shards
        self.pack, self.groups, self.extra_ids = c.pack, ["causal"], [EOS_ID]
        train = open_shards(c, model_cfg, "train", with_sentinels=False)
        val = open_shards(c, model_cfg, "val", with_sentinels=False) if c.eval_interval or c.trim_vocab else None
        self.shard_sets = [s for s in (train, val) if s is not None]
        self.sampler = WindowSampler(train, c.dec_len + 1, c.seed, f"{c.data_dir} train split")
        self.val_sampler = WindowSampler(val, c.dec_len + 1, 0, f"{c.data_dir} val split") if val else None

    def _batch(self, windows):
        b = {"idx": windows[:, :-1], "labels": windows[:, 1:]}
        if self.pack:
            b["seg"] = document_segments(b["idx"])
        return b

    def train_batch(self, step, first, rows):
        return self._batch(self.sampler.windows(first, rows))

    def eval_batch(self, index, rows):
        if self.val_sampler is None:
            return None
        b = self._batch(self.val_sampler.windows(index * rows, rows))
        b["group"] = np.zeros(rows, np.int64)
        return b

    def real_tokens(self, b):
        n = b["idx"].size
        return 0, n, int(b["seg"].max(1).sum()) if "seg" in b else len(b["idx"])

    def loss(self, model, b):
        _, loss_sum = model(b["idx"], labels=b["labels"], seg=b.get("seg"), reduction="sum")
        return loss_sum, b["labels"].numel()
