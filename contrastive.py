"""The contrastive objective: the encoder becomes an embedding model (InfoNCE, in-batch negatives).

    python train.py --objective=contrastive --init_from=pretrained --init_path=out/ul2 \
        --contrastive_data=../shared/data/nli/snli_train_subset.tsv \
        --contrastive_val_data=../shared/data/nli/snli_dev.tsv
    python extract.py --ckpt out/contrastive --out out/encoder --verify     # pooling, prompts from the run

The trained model is a decoder-only `model.Qwen3` run with attn='bidirectional': a UL2 checkpoint's encoder
(embed + encoder.* become embed + decoder.*), an extracted encoder directory, a Hugging Face Qwen3 directory
(bidirectional without UL2: the baseline) or scratch. Its checkpoints are Hugging Face Qwen3 directories that
extract.py turns into an encoder directory.

Data (`contrastive_data`, `contrastive_val_data`):
  - a TSV with header premise, hypothesis, label (NLI, quoting off): one example per premise that has an
    entailment hypothesis (the positive) and, with hard negatives on, a contradiction (the hard negative);
    which of several is drawn per epoch. SimCSE's supervised recipe.
  - a TSV with header anchor, positive[, negative]: pairs or triplets as they stand.
  - any other file: one sentence per line, each example the sentence twice (unsupervised SimCSE: the two
    copies differ only by dropout, so set contrastive_*_dropout > 0).
Slot 0 of an example is the query (contrastive_query_prefix is prepended to its text), the others are
documents (contrastive_doc_prefix). Before either goes the mode token (contrastive_mode_token, e.g. '<|ul2_S|>';
'auto', the default, keeps the starting point's: an extracted encoder's default prompt, else none, as the
laptop ablation (b) found no gain from <|ul2_S|> under enc_rope='prefix'): mode + prefix + text, joined as
strings as sentence-transformers' prompts are and tokenized as eval_embed embeds them (special tokens allowed,
no eos). extract.py exports the mode token as the directory's 'default' prompt, put before every text no other
prompt is asked for (STS included), and mode + prefix as its 'query' / 'document' prompts.

Loss: for query i, cross-entropy over scale * cos(q_i, c) for every candidate c = every positive and hard
negative of the batch, the target being its own positive (scale = 1 / temperature). Under torchrun the
candidates are all-gathered from every process with their gradient, so the negatives are batch_size x
processes (grad_accum does not enlarge them). With Matryoshka dims the loss is the weighted sum of the same
loss on each prefix e[:, :d] of the embeddings (each prefix normalised).
"""
import csv
import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

CONFIG = {
    "contrastive_data": "",                # training data (see the docstring for the formats)
    "contrastive_val_data": "",            # validation data, same formats; '' = no validation loss
    "contrastive_hard_negatives": True,    # NLI: the contradiction hypothesis as a hard negative (triplets)
    "contrastive_temperature": 0.05,       # softmax temperature (SimCSE's); the initial one when learned
    "contrastive_learn_temperature": False,  # learn log(1 / temperature) (CLIP), capped at scale 100; train.py
                                           # optimises it with the model (Objective.parameters())
    "contrastive_pooling": "mean",         # 'mean', 'last' (last real token) or 'cls' (first token)
    "contrastive_max_len": 64,             # tokens per text (prefix included)
    "contrastive_matryoshka_dims": [],     # e.g. [256, 128, 64, 32]: loss on each prefix; [] = the full width
    "contrastive_matryoshka_weights": [],  # one weight per dim; [] = 1 each
    "contrastive_query_prefix": "",        # e.g. 'query: '
    "contrastive_doc_prefix": "",          # e.g. 'passage: '
    "contrastive_mode_token": "auto",      # text before every text, queries, documents and STS alike (the exported
                                           # 'default' prompt), e.g. '<|ul2_S|>'; 'auto' = the starting point's: an
                                           # extracted encoder's default prompt, '' from UL2, Qwen3 or scratch
    "contrastive_attn_dropout": 0.1,       # on attention probabilities (model.set_dropout), training only
    "contrastive_hidden_dropout": 0.1,     # on each block's attention and MLP outputs
    "contrastive_gather": True,            # under torchrun: negatives from every process
}
POOLINGS = ("mean", "cls", "last")
MAX_SCALE = 100.0


# ---------------------------------------------------------------------------------------
# the loss

class _AllGather(torch.autograd.Function):
    """Concatenate every process's [n, C] rows (rank order). Backward: each process's loss touches every
    slice, so the gradient of a process's own rows is the sum over processes of the gradient of its slice."""

    @staticmethod
    def forward(ctx, x):
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather(x):
    """x [n, C] from every process (the same n everywhere), with gradient; x itself in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _AllGather.apply(x)


def info_nce(q, docs, target, scale):
    """Per-query loss [n]: cross-entropy of scale * cos(q_i, docs_j) over all j, target j = target[i]."""
    logits = scale * F.normalize(q, dim=-1) @ F.normalize(docs, dim=-1).T
    return F.cross_entropy(logits.float(), target, reduction="none")


def contrastive_loss(q, pos, neg=None, scale=1 / 0.05, dims=None, weights=None, gather=False):
    """The SUM over this process's queries of sum_k weights[k] * InfoNCE on the prefix [:dims[k]].

    q, pos [n, C]: query i's positive is pos[i]; neg [n, C] or None: hard negatives (neg[i] belongs to
    query i but is a candidate for every query). Candidates: all positives, then all hard negatives, of
    every process when gather is on."""
    dims = dims or [q.shape[-1]]
    weights = weights or [1.0] * len(dims)
    spread = gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    g = all_gather if spread else (lambda x: x)
    cands = g(pos) if neg is None else torch.cat([g(pos), g(neg)])
    # this process's queries are rows rank*n .. rank*n + n-1 of the gathered batch
    target = torch.arange(q.shape[0], device=q.device) + (dist.get_rank() * q.shape[0] if spread else 0)
    total = q.new_zeros((), dtype=torch.float32)
    for d, w in zip(dims, weights):
        total = total + w * info_nce(q[:, :d], cands[:, :d], target, scale).sum()
    return total


def pool(states, mask, how):
    """[B, T, C] states, [B, T] mask (True = real token) -> [B, C] fp32 (eval_embed.pool, the inference rule)."""
    import eval_embed
    return eval_embed.pool(states, mask, how)


# ---------------------------------------------------------------------------------------
# data

def read_tsv(path):
    """(header, rows) of a tab-separated file read with quoting off (NLI text holds bare quotes)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise ValueError(f"{path}: empty file")
    return rows[0], rows[1:]


def is_tsv_examples(path):
    """True when the first line names the columns of an NLI or pairs TSV."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
    return {"premise", "hypothesis", "label"} <= set(header) or {"anchor", "positive"} <= set(header)


def read_examples(path, hard_negatives=True):
    """A data file -> list of examples, each a tuple of candidate lists: (queries, positives[, negatives]).
    Every slot holds one or more texts; an epoch draws one text per slot."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file (contrastive_data / contrastive_val_data)")
    if not is_tsv_examples(path):  # SimCSE: each line twice
        with open(path, encoding="utf-8") as f:
            lines = [s.strip() for s in f]
        out = [([s], [s]) for s in lines if s]
        if not out:
            raise ValueError(f"{path}: no non-empty lines")
        return out
    header, rows = read_tsv(path)
    col = {name: i for i, name in enumerate(header)}
    out = []
    if "premise" in col:
        by_premise = {}
        for n, r in enumerate(rows, start=2):
            if len(r) < len(header):
                raise ValueError(f"{path}:{n}: expected {len(header)} tab-separated columns, got {len(r)}")
            p, h, label = r[col["premise"]].strip(), r[col["hypothesis"]].strip(), r[col["label"]].strip()
            if p and h:
                by_premise.setdefault(p, {}).setdefault(label, []).append(h)
        for p, hyps in by_premise.items():
            ent, con = hyps.get("entailment", []), hyps.get("contradiction", [])
            if ent and (con or not hard_negatives):
                out.append(([p], ent, con) if hard_negatives else ([p], ent))
    else:
        use_neg = hard_negatives and "negative" in col
        for n, r in enumerate(rows, start=2):
            if len(r) < len(header):
                raise ValueError(f"{path}:{n}: expected {len(header)} tab-separated columns, got {len(r)}")
            ex = [[r[col["anchor"]]], [r[col["positive"]]]] + ([[r[col["negative"]]]] if use_neg else [])
            out.append(tuple(ex))
    if not out:
        raise ValueError(f"{path}: no usable examples (NLI needs premises with an entailment"
                         f"{' and a contradiction hypothesis' if hard_negatives else ''})")
    return out


class ExampleStream:
    """Example k of the run -> texts (one per slot). Each epoch visits every example once in a random
    order, and draws which of a slot's texts to use, both from (seed, epoch): deterministic in k alone."""

    def __init__(self, examples, seed, shuffle=True):
        self.examples, self.seed, self.shuffle = examples, seed, shuffle
        self.epoch, self.order = -1, None

    def __len__(self):
        return len(self.examples)

    def get(self, k):
        epoch, j = divmod(k, len(self.examples))
        if epoch != self.epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self.epoch = epoch
            self.order = rng.permutation(len(self.examples)) if self.shuffle else np.arange(len(self.examples))
            self.picks = rng.integers(0, 1 << 30, size=(len(self.examples), len(self.examples[0])))
        i = int(self.order[j])
        return [slot[int(self.picks[j, s]) % len(slot)] for s, slot in enumerate(self.examples[i])]


# ---------------------------------------------------------------------------------------
# the objective

def qwen3_from_encoder(cfg, tensors):
    """A decoder-only Qwen3 holding an encoder-decoder's encoder (embed.weight + encoder.* tensors)."""
    from dataclasses import replace
    import eval_embed
    cfg = replace(cfg, num_layers=cfg.num_encoder_layers, num_encoder_layers=0, tie_embeddings=True)
    return eval_embed.qwen3_from_tensors(cfg, tensors)


def start_source(path):
    """(config.json path's directory, its model_type) of a starting point; a training out_dir gives its newest
    checkpoint."""
    import json
    import checkpoint
    if not os.path.isdir(path):
        raise ValueError(f"init path {path}: no such directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        found = checkpoint.newest(path, weights=True)
        if found is None:
            raise ValueError(f"init path {path}: no config.json and no ckpt-NNNNNNN directories; pass a UL2 "
                             "checkpoint, a training out_dir, an extracted encoder or a Qwen3 directory")
        path = found
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    kind = d.get("model_type")
    if kind not in ("qwen3", "qwen3_encdec", "qwen3_encoder"):
        raise ValueError(f"init path {path}/config.json: model_type {kind!r} is none of qwen3_encdec (UL2 "
                         "checkpoint), qwen3_encoder (extract.py) or qwen3 (Hugging Face Qwen3)")
    return path, kind, d


def start_config(path):
    """The decoder-only ModelConfig contrastive training will have from this starting point (no weights read)."""
    from dataclasses import replace
    import eval_embed
    from model_config import ModelConfig
    path, kind, d = start_source(path)
    if kind == "qwen3":
        return ModelConfig.from_hf(d)
    if kind == "qwen3_encoder":
        return eval_embed.model_config_of(d)
    cfg = ModelConfig.from_dict(d)
    return replace(cfg, num_layers=cfg.num_encoder_layers, num_encoder_layers=0, tie_embeddings=True)


def load_start(path):
    """The model contrastive training starts from: a UL2 checkpoint (or a training out_dir: its newest), an
    extracted encoder directory, or a Hugging Face Qwen3 directory (run bidirectionally)."""
    import eval_embed
    import extract
    import model as M
    path, kind, _ = start_source(path)
    if kind == "qwen3":
        return M.Qwen3.from_pretrained(path)
    if kind == "qwen3_encoder":
        return eval_embed.load_encoder_dir(path)[0]
    cfg, tensors = extract.encoder_tensors(path)
    return qwen3_from_encoder(cfg, tensors)


def resolve_mode_token(c):
    """The text contrastive_mode_token stands for in this run: 'auto' keeps the starting point's (an extracted
    encoder's default prompt; a resumed run the one its checkpoint recorded, '' for runs from before the key
    existed), else none."""
    mode = getattr(c, "contrastive_mode_token", CONFIG["contrastive_mode_token"])
    if mode != "auto":
        return mode
    init_from = getattr(c, "init_from", "scratch")
    if init_from == "resume":
        import checkpoint
        source = checkpoint.newest(c.out_dir)
        if source is None:
            raise ValueError(f"init_from='resume': no checkpoint ckpt-NNNNNNN in {c.out_dir}")
        return checkpoint.read_trainer_state(source).get("config", {}).get("contrastive_mode_token", "")
    if init_from == "pretrained":
        _, kind, d = start_source(c.init_path)
        if kind == "qwen3_encoder":
            return (d.get("prompts") or {}).get("default", "")
    return ""


def encoder_states(model, ids, mask):
    """Final states [B, T, C] of the Qwen3 run bidirectionally, through model.forward when it can return
    them (DDP and FSDP hook forward), else hidden() on the unwrapped model."""
    raw = getattr(model, "module", model)
    if getattr(raw, "_forward_returns_hidden", None) is None:
        import inspect
        raw._forward_returns_hidden = "output" in inspect.signature(raw.forward).parameters
    if raw._forward_returns_hidden:
        return model(ids, attention_mask=mask, attn="bidirectional", output="hidden")[0]
    return raw.hidden(ids, mask, attn="bidirectional")


class Objective:
    model_type = "decoder"
    id_keys = ("ids",)

    def __init__(self, c, model_cfg, rank=0, world=1):
        import tokenizer as tok
        g = lambda k: getattr(c, k, CONFIG[k])  # noqa: E731
        self.pooling = g("contrastive_pooling")
        if self.pooling not in POOLINGS:
            raise ValueError(f"config key 'contrastive_pooling' is {self.pooling!r}; choose one of {', '.join(POOLINGS)}")
        self.temperature = float(g("contrastive_temperature"))
        if not self.temperature > 0:
            raise ValueError(f"config key 'contrastive_temperature' must be > 0, got {self.temperature}")
        self.max_len = int(g("contrastive_max_len"))
        if self.max_len < 1:
            raise ValueError(f"config key 'contrastive_max_len' must be >= 1, got {self.max_len}")
        width = model_cfg.hidden_size
        self.dims = [int(d) for d in g("contrastive_matryoshka_dims")] or [width]
        if any(not 0 < d <= width for d in self.dims) or len(set(self.dims)) != len(self.dims):
            raise ValueError(f"config key 'contrastive_matryoshka_dims' {self.dims}: distinct widths in "
                             f"1..{width} (the model's hidden_size)")
        self.weights = [float(w) for w in g("contrastive_matryoshka_weights")] or [1.0] * len(self.dims)
        if len(self.weights) != len(self.dims):
            raise ValueError(f"config key 'contrastive_matryoshka_weights' has {len(self.weights)} weights for "
                             f"{len(self.dims)} contrastive_matryoshka_dims")
        self.dropout = (float(g("contrastive_attn_dropout")), float(g("contrastive_hidden_dropout")))
        if any(not 0 <= p < 1 for p in self.dropout):
            raise ValueError(f"config keys 'contrastive_attn_dropout' / 'contrastive_hidden_dropout' must be in "
                             f"[0, 1), got {self.dropout}")
        if model_cfg.is_encoder_decoder:
            raise ValueError("objective='contrastive' trains a decoder-only Qwen3 run bidirectionally; start from a "
                             "UL2 checkpoint with init_from='pretrained' (its encoder), or a decoder-only preset")
        if not g("contrastive_data"):
            raise ValueError("objective='contrastive' needs --contrastive_data=FILE (NLI TSV, anchor/positive TSV, "
                             "or one sentence per line)")
        self.prefixes = (g("contrastive_query_prefix"), g("contrastive_doc_prefix"))
        self.mode = resolve_mode_token(c)
        # recorded resolved: trainer_state.json's config is what extract.py and eval_embed read the prompts from
        c.contrastive_mode_token = self.mode
        self.gather = bool(g("contrastive_gather"))
        hard = bool(g("contrastive_hard_negatives"))
        self.seed = getattr(c, "seed", 0)
        self.train = ExampleStream(read_examples(g("contrastive_data"), hard), self.seed)
        val = g("contrastive_val_data")
        self.val = ExampleStream(read_examples(val, hard), 0, shuffle=False) if val else None
        self.slots = {len(e) for e in self.train.examples} | ({len(e) for e in self.val.examples} if val else set())
        if len(self.slots) != 1:
            raise ValueError(f"contrastive_data / contrastive_val_data: their examples have different numbers of "
                             f"texts {sorted(self.slots)} (pairs vs triplets); use one kind in both")
        self.groups = ["all"]
        self.tokenizer = tok.load_tokenizer()
        self.log_scale = None
        if g("contrastive_learn_temperature"):
            self.log_scale = nn.Parameter(torch.tensor(math.log(1 / self.temperature)))
            self._log_scale0 = float(self.log_scale.detach())
            if world > 1:  # DDP does not see this parameter: average its gradient as DDP averages the model's
                self.log_scale.register_hook(_average_over_processes)
        self._extra_ids = None
        self._dropout_set = None

    # ---- optional hooks

    def parameters(self):
        """Trainable parameters besides the model's (the learned temperature), as (name, parameter)."""
        return [] if self.log_scale is None else [("contrastive.log_scale", self.log_scale)]

    def load_init(self, path):
        m = load_start(path)
        m.set_dropout(*self.dropout)
        return m

    @staticmethod
    def init_config(path):
        """The ModelConfig load_init(path) will give, without reading weights."""
        return start_config(path)

    @property
    def extra_ids(self):
        """Every token id the data and prefixes use (what trim_vocab must keep): the run has no shards."""
        if self._extra_ids is None:
            ids = set()
            for stream in (self.train, self.val):
                for ex in (stream.examples if stream else []):
                    texts = [self.text(s, t) for s, slot in enumerate(ex) for t in slot]
                    for x in self.tokenizer.encode_batch(texts):
                        ids.update(x[:self.max_len])
            import tokenizer as tok
            ids.add(tok.PAD_ID)
            self._extra_ids = tuple(sorted(ids))
        return self._extra_ids

    # ---- batches

    def text(self, slot, t):
        """What the model reads for text t in slot 0 (the query) or a later slot (a document)."""
        return self.mode + self.prefixes[min(slot, 1)] + t

    def pack(self, examples):
        """list of [query, doc, (neg)] texts -> ids, mask [rows, k, T] (right-padded, T = the longest)."""
        import eval_embed
        k = len(examples[0])
        texts = [self.text(s, t) for ex in examples for s, t in enumerate(ex)]
        toks = eval_embed.tokenize(self.tokenizer, texts, self.max_len)
        T = max(len(x) for x in toks)
        ids = np.full((len(texts), T), self.tokenizer.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), T), dtype=bool)
        for i, x in enumerate(toks):
            ids[i, :len(x)] = x
            mask[i, :len(x)] = True
        return {"ids": ids.reshape(len(examples), k, T), "mask": mask.reshape(len(examples), k, T)}

    def train_batch(self, step, first, rows):
        return self.pack([self.train.get(k) for k in range(first, first + rows)])

    def eval_batch(self, index, rows):
        if self.val is None:
            return None
        b = self.pack([self.val.get(k % len(self.val)) for k in range(index * rows, (index + 1) * rows)])
        b["group"] = np.zeros(rows, dtype=np.int64)
        b["labels"] = np.zeros(rows, dtype=np.int64)  # IGNORE_INDEX everywhere marks a dummy batch (train.py)
        return b

    def real_tokens(self, b):
        """(encoder tokens, decoder tokens, sequences) for tokens/s and MFU: every text is one sequence."""
        return 0, int(b["mask"].sum()), int(b["mask"].shape[0] * b["mask"].shape[1])

    # ---- loss

    def scale(self, device):
        if self.log_scale is None:
            return 1.0 / self.temperature
        if self.log_scale.device != device:
            self.log_scale.data = self.log_scale.data.to(device)
        self._calls = getattr(self, "_calls", 0) + 1
        if self._calls == 20 and self.log_scale.grad is not None and \
                float(self.log_scale.detach()) == self._log_scale0:
            # a trainer that never steps Objective.parameters() leaves it where it started: say so, once
            print(f"warning: contrastive_learn_temperature: the temperature has a gradient but is still "
                  f"{self.temperature} after 20 batches; is Objective.parameters() in the optimiser?", flush=True)
        return self.log_scale.exp().clamp(max=MAX_SCALE)

    def embed(self, model, ids, mask):
        """ids, mask [rows, k, T] -> pooled embeddings [rows, k, C] (fp32, not normalised)."""
        raw = getattr(model, "module", model)
        if self._dropout_set is not raw and hasattr(raw, "set_dropout"):
            raw.set_dropout(*self.dropout)
            self._dropout_set = raw
        R, k, T = ids.shape
        ids, mask = ids.reshape(R * k, T), mask.reshape(R * k, T)
        return pool(encoder_states(model, ids, mask), mask, self.pooling).view(R, k, -1)

    def loss(self, model, batch):
        e = self.embed(model, batch["ids"], batch["mask"])
        if "labels" in batch and bool((batch["labels"] == -100).all()):  # a dummy batch keeping processes in step
            return e.sum() * 0.0, 0
        gather = self.gather and torch.is_grad_enabled()  # validation batches are scored on their own
        total = contrastive_loss(e[:, 0], e[:, 1], e[:, 2] if e.shape[1] > 2 else None, self.scale(e.device),
                                 self.dims, self.weights, gather)
        return total, e.shape[0]


def _average_over_processes(grad):
    grad = grad.clone()
    dist.all_reduce(grad)
    return grad / dist.get_world_size()
