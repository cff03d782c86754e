"""Reversible vocabulary trimming for laptop-scale runs.

At hidden 256 the 152,036-row tied embedding costs about 12x the transformer body per trained
token, so a small CPU run spends nearly all its time in the LM head. A run may instead train only
the rows its corpus can use: the ids that occur in its shards plus the ids the objective adds
(end of text, UL2 mode tokens, sentinels). Inside the run those rows are renumbered 0..K-1; every
checkpoint scatters them back into the full matrix, so what is saved is an ordinary full-vocabulary
model (rows never trained keep their initial values) and nothing downstream knows trimming happened.

The softmax of a trimmed run is over the K kept classes only, so its loss is not the full-vocabulary
loss (it is lower by the probability mass the dropped rows would have taken).
"""
import numpy as np
import torch
import torch.nn as nn

from tokenizer import EOS_ID, MODE_IDS, NUM_SENTINELS, SENTINEL_START

CHUNK = 1 << 24


def used_ids(datasets, vocab_size, objective_ids=()):
    """Sorted ids that occur in any shard of `datasets` (ShardDataset objects) or in objective_ids."""
    seen = np.zeros(vocab_size, dtype=bool)
    for ds in datasets:
        for shard in ds.shards:
            for start in range(0, len(shard), CHUNK):
                seen[np.asarray(shard[start:start + CHUNK], dtype=np.int64)] = True
    seen[np.asarray(list(objective_ids), dtype=np.int64)] = True
    return np.flatnonzero(seen)


def objective_ids(encoder_decoder):
    """Ids the training objective writes into batches on top of the corpus."""
    ids = [EOS_ID]
    if encoder_decoder:
        ids += list(MODE_IDS.values()) + list(range(SENTINEL_START, SENTINEL_START + NUM_SENTINELS))
    return ids


class VocabTrim:
    def __init__(self, kept, full_size):
        self.kept = torch.as_tensor(np.asarray(kept), dtype=torch.long)
        self.full_size = full_size
        self.lookup = np.full(full_size, -1, dtype=np.int64)
        self.lookup[np.asarray(kept)] = np.arange(len(kept))
        self.full_embed = None  # the full matrix, kept on CPU to scatter trained rows back into

    def __len__(self):
        return len(self.kept)

    def to_compact(self, ids):
        """Full ids -> compact ids for a numpy array; negative values (ignore index) pass through."""
        out = np.where(ids >= 0, self.lookup[np.maximum(ids, 0)], ids)
        if (out[ids >= 0] < 0).any():
            raise ValueError("vocab_trim: a batch holds an id outside the kept vocabulary; the kept ids must be "
                             "computed from the same shards the batches come from")
        return out

    def shrink(self, model):
        """Replace the model's (tied) embedding by its kept rows, remembering the full matrix."""
        if getattr(model, "lm_head", None) is not None:
            raise ValueError("vocab_trim needs tied embeddings (the LM head is the embedding matrix)")
        full = model.embed.weight.detach()
        if full.shape[0] != self.full_size:
            raise ValueError(f"vocab_trim: model has {full.shape[0]} rows, the kept ids index {self.full_size}")
        self.full_embed = full.cpu().clone()
        model.embed = nn.Embedding.from_pretrained(full[self.kept].clone(), freeze=False)
        return model

    def expand_state(self, state):
        """A state dict from the trimmed model -> the same with a full-size embed.weight."""
        trimmed = state["embed.weight"]
        full = self.full_embed.to(trimmed.dtype).clone()
        full[self.kept] = trimmed.detach().cpu()
        return {**state, "embed.weight": full}

    def shrink_state(self, state):
        """A full-vocabulary state dict (a checkpoint) -> rows for the trimmed model; remembers the full matrix."""
        self.full_embed = state["embed.weight"].detach().cpu().clone()
        return {**state, "embed.weight": self.full_embed[self.kept].clone()}
