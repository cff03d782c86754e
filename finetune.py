"""Fine-tune the encoder with a task head: extractive QA, sentence-pair classification (NLI), regression (STS-B).

    python finetune.py qa  --init out/laptop/encoder --out out/ft/qa            # SQuAD v1.1 JSON, start/end head
    python finetune.py nli --init out/laptop/encoder --out out/ft/nli --attn causal
    python finetune.py sts --init /path/to/Qwen3-0.6B --out out/ft/sts --pooling last
    python finetune.py predict --model out/ft/qa --data dev.json --out predictions.json   # n-best answer spans
    python finetune.py score DATA.json PREDICTIONS.json                                  # SQuAD v1.1 EM / F1

--init is where the encoder starts: a directory written by extract.py, a UL2 checkpoint (or a training
out_dir: its latest checkpoint; the encoder half is used), a Hugging Face Qwen3 directory, or a QA directory
this script wrote. Its blocks run with --attn bidirectional (the Gemma-encoder recipe: the causal mask is
removed, nothing else changes) or --attn causal (the same weights as a decoder reads them: the comparison).

QA: the input is `question <|endoftext|> context-window <|endoftext|>` (with --markers, unused Qwen3 rows
151672/151673 mark the question and the context instead); long contexts are cut into windows of
--max_len tokens overlapping by --doc_stride. A Linear(hidden, 2) head gives start/end logits; a window
that does not hold the answer points both at the final <|endoftext|> (the null position: Qwen3 has no CLS,
and the last token is the one a causal model lets read everything). Answers come back as character spans
of the context from the tokenizer's offsets (tokenizer.encode_offsets); an answer given only as text (no
answer_start) is found in its context by exact, then fuzzy (>= --evidence_threshold) match. Prediction
searches the --n_best best starts x ends of every window, spans of at most --max_answer_len tokens, scored
by their log-probabilities within the window (so windows compare). The output directory loads in
transformers: pipeline("question-answering", model=DIR, trust_remote_code=True) (hf_qa.py) gives the
same spans as `predict`.

NLI / STS-B: `premise <|endoftext|> hypothesis <|endoftext|>` pooled (--pooling mean | last | cls) into a
small MLP head: 3-way cross-entropy (accuracy on snli_dev) or a regression onto score/5 (Spearman on
stsb_dev). The Gemma-encoder ablation axes are options: --attn, --dropout, --padding_side, --pooling.
Each run writes results.json (metrics, settings, steps, wall time) into --out.
"""
import argparse
import bisect
import collections
import csv
import difflib
import json
import math
import os
import random
import re
import shutil
import string
import sys
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import tokenizer as tk

HERE = os.path.dirname(os.path.abspath(__file__))
QA_MODEL_TYPE = "qwen3_encoder_qa"
ENCODER_MODEL_TYPE = "qwen3_encoder"  # what extract.py writes
Q_MARK, C_MARK = 151672, 151673  # unused Qwen3 embedding rows, in every vocabulary the project uses
NLI_LABELS = ("entailment", "neutral", "contradiction")
POOLINGS = ("mean", "last", "cls")
PUNCTUATION = set(string.punctuation)


def fail(msg):
    print(f"finetune: {msg}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------------------------------
# SQuAD v1.1 metric (the official definitions)

def normalize_answer(s):
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction, truth):
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_score(prediction, truth):
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(data, predictions):
    """{"exact_match", "f1"} x100 of `predictions` (question id -> answer text) on a SQuAD file's `data` list:
    the best score over each question's gold answers; a question without a prediction scores 0."""
    em = f1 = total = 0
    for article in data:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    continue
                golds = [a["text"] for a in qa["answers"]]
                pred = predictions[qa["id"]]
                em += max(exact_match(pred, g) for g in golds)
                f1 += max(f1_score(pred, g) for g in golds)
    return {"exact_match": 100.0 * em / max(total, 1), "f1": 100.0 * f1 / max(total, 1)}


# ---------------------------------------------------------------------------------------
# finding evidence text in a context

def find_evidence(text, evidence, threshold=0.8):
    """(start, end, similarity) of the span of `text` that is `evidence`: an exact match if there is one,
    else the run of whole words most similar to it (difflib ratio, case and spacing ignored) if that is
    >= threshold; None otherwise. For data that quotes its answers but does not say where they are."""
    i = text.find(evidence)
    if i >= 0 and evidence:
        return i, i + len(evidence), 1.0
    want = " ".join(evidence.lower().split())
    if not want:
        return None
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    n = len(want.split())
    lo, hi = max(1, math.floor(0.7 * n)), math.ceil(1.3 * n) + 1
    sm = difflib.SequenceMatcher(None, autojunk=False)
    sm.set_seq2(want)
    best, best_r = None, threshold
    for a in range(len(words)):
        for b in range(a + lo - 1, min(a + hi, len(words))):
            sm.set_seq1(" ".join(text[words[a][0]:words[b][1]].lower().split()))
            if sm.real_quick_ratio() < best_r or sm.quick_ratio() < best_r:
                continue
            r = sm.ratio()
            if r > best_r or (best is None and r >= best_r):
                best, best_r = (words[a][0], words[b][1], r), r
    return best


# ---------------------------------------------------------------------------------------
# starting points: every kind of directory becomes a model.Qwen3 whose blocks we run as an encoder

def config_of(d):
    """ModelConfig of an exported encoder's config.json (Hugging Face key names)."""
    from model_config import ModelConfig
    n = d["num_hidden_layers"]
    return ModelConfig(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                       intermediate_size=d["intermediate_size"], num_layers=n, num_encoder_layers=n,
                       num_heads=d["num_attention_heads"], num_kv_heads=d["num_key_value_heads"],
                       head_dim=d["head_dim"], rope_theta=d["rope_theta"], rms_norm_eps=d["rms_norm_eps"],
                       max_seq_len=d["max_position_embeddings"])


def load_encoder(path):
    """model.Qwen3 holding the encoder of `path` (its layers under decoder.*, run with attn= of our choice)."""
    import model as M
    from model_components import Rotary
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--init {path}: no such directory")
    if not os.path.isfile(os.path.join(path, "config.json")):  # a training out_dir: its newest complete checkpoint
        path = checkpoint.newest(path, weights=True, log=lambda msg: print(msg, file=sys.stderr)) or path
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"--init {path}: no config.json; pass an extract.py directory, a UL2 checkpoint "
                                "or out_dir, or a Hugging Face Qwen3 directory")
    with open(cfg_path) as f:
        d = json.load(f)
    kind = d.get("model_type")
    if kind == "qwen3":  # a decoder used directly as an encoder
        m = M.Qwen3.from_pretrained(path)
        m.lm_head = None  # an untied LM head has no use here
        m.rotary = Rotary(m.cfg.head_dim, m.cfg.rope_theta)
        return m
    if kind == "qwen3_encdec":
        ed = M.EncoderDecoder.from_pretrained(path)
        cfg, sd = ed.cfg, ed.state_dict()
    elif kind in (ENCODER_MODEL_TYPE, QA_MODEL_TYPE):
        cfg, sd = config_of(d), M.read_safetensors_dir(path)
    else:
        raise ValueError(f"{cfg_path}: model_type {kind!r} is not one of qwen3, qwen3_encdec, "
                         f"{ENCODER_MODEL_TYPE}, {QA_MODEL_TYPE}")
    cfg = replace(cfg, num_layers=cfg.num_encoder_layers, num_encoder_layers=0, tie_embeddings=True)
    sd = {("decoder." + k[len("encoder."):]) if k.startswith("encoder.") else k: v for k, v in sd.items()
          if k == "embed.weight" or k.startswith("encoder.")}
    with torch.device("meta"):
        m = M.Qwen3(cfg)
    m.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    m.rotary = Rotary(cfg.head_dim, cfg.rope_theta)  # derived, not stored
    return m


# ---------------------------------------------------------------------------------------
# the task model

def pool(states, mask, how):
    """[B, T, C] states, [B, T] mask (1 = real token, either padding side) -> [B, C]; cls = first real token."""
    mask = mask.to(states.dtype)
    if how == "mean":
        return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
    rows = torch.arange(states.shape[0], device=states.device)
    m = mask.long()
    if how == "cls":
        return states[rows, m.argmax(1)]
    if how == "last":
        return states[rows, m.shape[1] - 1 - m.flip(1).argmax(1)]
    raise ValueError(f"--pooling must be one of {POOLINGS}, got {how!r}")


class TaskModel(nn.Module):
    """The encoder plus a head: 'qa' (start/end logits per token), 'classify' (n classes) or 'regress'."""

    def __init__(self, encoder, task, attn="bidirectional", pooling="mean", num_labels=3, dropout=0.0):
        super().__init__()
        if attn not in ("bidirectional", "causal"):
            raise ValueError(f"--attn must be bidirectional or causal, got {attn!r}")
        self.encoder, self.task, self.attn, self.pooling = encoder, task, attn, pooling
        C = encoder.cfg.hidden_size
        if task == "qa":
            self.qa_head = nn.Linear(C, 2)
        else:
            out = 1 if task == "regress" else num_labels
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(C, C), nn.GELU(), nn.Dropout(dropout),
                                      nn.Linear(C, out))
        for mod in (self.qa_head if task == "qa" else self.head).modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=0.02)
                nn.init.zeros_(mod.bias)

    def forward(self, ids, mask):
        dev = self.encoder.embed.weight.device
        ids, mask = ids.to(dev), mask.to(dev)
        h = self.encoder.hidden(ids, mask, attn=self.attn)
        if self.task == "qa":
            start, end = self.qa_head(h).float().unbind(-1)
            return start, end
        out = self.head(pool(h, mask, self.pooling)).float()
        return out[:, 0] if self.task == "regress" else out


def init_marker_rows(encoder):
    """Marker rows start at the mean of the rows text uses (Qwen3 never trained the unused rows)."""
    with torch.no_grad():
        w = encoder.embed.weight
        w[[Q_MARK, C_MARK]] = w[:tk.EOS_ID].mean(0)


def collate(rows, padding_side="right"):
    """rows of token ids -> (ids [B, T], mask [B, T], shift [B]) padded with <|endoftext|>; shift[b] is how far
    row b's tokens moved right (left padding)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tk.PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    shift = torch.zeros(len(rows), dtype=torch.long)
    for b, r in enumerate(rows):
        s = T - len(r) if padding_side == "left" else 0
        ids[b, s:s + len(r)] = torch.tensor(r)
        mask[b, s:s + len(r)] = True
        shift[b] = s
    return ids, mask, shift


# ---------------------------------------------------------------------------------------
# QA data: examples, windows, spans

def load_squad(path, evidence_threshold=0.8):
    """(data, examples) of a SQuAD v1.1-format file; each example holds id, question, context, answers
    [(text, start)]. Answers without answer_start are located by find_evidence."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)["data"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a SQuAD v1.1 JSON file ({e})")
    try:
        return data, _squad_examples(data, path, evidence_threshold)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not in SQuAD v1.1 form ({type(e).__name__}: {e})")


def _squad_examples(data, path, evidence_threshold):
    examples, located, dropped = [], 0, 0
    for ai, article in enumerate(data):
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                answers = []
                for a in qa.get("answers", []):
                    if "answer_start" in a:
                        answers.append((a["text"], int(a["answer_start"])))
                        continue
                    found = find_evidence(context, a["text"], evidence_threshold)
                    if found is None:
                        dropped += 1
                        continue
                    located += 1
                    answers.append((context[found[0]:found[1]], found[0]))
                examples.append({"id": qa["id"], "question": qa["question"], "context": context,
                                 "answers": answers, "article": ai})
    if located or dropped:
        print(f"{path}: {located} answers located by evidence matching, {dropped} not found (dropped)")
    return examples


def split_articles(data, every=10, offset=4):
    """(train, val) article lists: every `every`-th article (from `offset`) is validation."""
    val = [a for i, a in enumerate(data) if i % every == offset]
    return [a for i, a in enumerate(data) if i % every != offset], val


def char_to_token(offsets, start, end):
    """Token span (first, last) covering characters [start, end) of the text `offsets` came from."""
    first = bisect.bisect_right([e for _, e in offsets], start)
    last = bisect.bisect_left([s for s, _ in offsets], end) - 1
    return first, last


def token_to_char(text, offsets, first, last):
    """Character span of tokens first..last, without the whitespace a token starts (or ends) with."""
    s, e = offsets[first][0], offsets[last][1]
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    return s, e


# Qwen's pre-tokenizer keeps punctuation runs together ("%).", "\","), and lets one punctuation mark lead a word
# ("-five", "—the"), so an answer ending at "%" inside "%)." could not be a token span. Contexts are therefore
# tokenized as usual and then such tokens are split: a run into its characters (a leading space stays with
# the first), a led word into the mark and the word. Only ~0.8% more tokens; the exact char -> token -> char
# round trip over the SQuAD subset goes from 98.6% to >= 99.5%. hf_qa.py repeats this exactly.
SPLIT_RUN = re.compile(r"^ ?[^\s\w]{2,}$")
SPLIT_LED = re.compile(r"^[^\s\w]\w+$")


def split_parts(piece):
    """The pieces a context token's text is re-encoded as, or None to keep it."""
    if SPLIT_RUN.match(piece):
        lead = 2 if piece[0] == " " else 1
        return [piece[:lead], *piece[lead:]]
    if SPLIT_LED.match(piece):
        return [piece[0], piece[1:]]
    return None


def encode_contexts(tok, contexts):
    """[(ids, offsets)] of QA contexts (offsets: character spans), punctuation split as described above."""
    cache, out = {}, []
    for text, (ids, offsets) in zip(contexts, tok.encode_batch_offsets(contexts, allow_special=False)):
        new_ids, new_off = [], []
        for t, (s, e) in zip(ids, offsets):
            piece = text[s:e]
            parts = split_parts(piece)
            if parts is not None and piece not in cache:
                # only a token that is exactly its text (not part of a character, not changed by NFC)
                cache[piece] = (tok.encode_batch_offsets(parts, allow_special=False)
                                if tok.encode(piece, allow_special=False) == [t] else None)
            if parts is None or cache[piece] is None:
                new_ids.append(t)
                new_off.append((s, e))
                continue
            at = s
            for part, (p_ids, p_off) in zip(parts, cache[piece]):
                new_ids += p_ids
                new_off += [(at + a, at + b) for a, b in p_off]
                at += len(part)
        out.append((new_ids, new_off))
    return out


def qa_prefix(q_ids, markers):
    return [Q_MARK, *q_ids, C_MARK] if markers else [*q_ids, tk.EOS_ID]


def context_windows(n, room, stride):
    """(start, end) token ranges of windows of `room` tokens over n context tokens, consecutive windows
    sharing `stride` tokens; the last one ends at n."""
    if n > room and room <= stride:
        raise ValueError(f"--max_len leaves {room} context tokens per window, not more than --doc_stride {stride}; "
                         "raise --max_len or lower --doc_stride / --max_query_len")
    out, s = [], 0
    while True:
        out.append((s, min(s + room, n)))
        if s + room >= n:
            return out
        s += room - stride


def qa_features(tok, examples, max_len=384, doc_stride=128, max_query_len=64, markers=False):
    """Windows of every example: dicts with ids, example (index), ctx_start (position of the window's first
    context token), offsets (character spans of the window's tokens in the context), start/end labels
    (positions; the null position, the final token, when the window lacks the answer)."""
    contexts = list(dict.fromkeys(e["context"] for e in examples))
    encoded = dict(zip(contexts, encode_contexts(tok, contexts)))
    questions = tok.encode_batch([e["question"] for e in examples], allow_special=False)
    feats = []
    for i, (ex, q) in enumerate(zip(examples, questions)):
        prefix = qa_prefix(q[:max_query_len], markers)
        c_ids, c_off = encoded[ex["context"]]
        span = None
        if ex["answers"] and c_ids:
            text, a0 = ex["answers"][0]
            span = char_to_token(c_off, a0, a0 + len(text))
        for s, e in context_windows(len(c_ids), max_len - len(prefix) - 1, doc_stride):
            ids = prefix + c_ids[s:e] + [tk.EOS_ID]
            null = len(ids) - 1
            start = end = null
            if span is not None and s <= span[0] and span[1] < e:
                start, end = len(prefix) + span[0] - s, len(prefix) + span[1] - s
            feats.append({"ids": ids, "example": i, "ctx_start": len(prefix), "offsets": c_off[s:e],
                          "start": start, "end": end})
    return feats


def allowed_positions(feats, T, shift):
    """[B, T] bool: the positions a start/end may point at (context tokens and the null position)."""
    allowed = torch.zeros((len(feats), T), dtype=torch.bool)
    for b, f in enumerate(feats):
        s = int(shift[b]) + f["ctx_start"]
        allowed[b, s:s + len(f["offsets"])] = True
        allowed[b, int(shift[b]) + len(f["ids"]) - 1] = True
    return allowed


def window_spans(start_logits, end_logits, n_ctx, n_best=20, max_answer_len=30):
    """Best (score, first, last) context-token spans of one window. start/end logits: numpy over the window's
    context tokens followed by its null position. Scores are log p(start) + log p(end) under a softmax over
    those positions, so spans of different windows compare."""
    def log_softmax(x):
        x = x.astype(np.float64)
        m = x.max()
        return x - (m + np.log(np.exp(x - m).sum()))
    ls, le = log_softmax(start_logits)[:n_ctx], log_softmax(end_logits)[:n_ctx]
    starts = np.argsort(-ls, kind="stable")[:n_best]
    ends = np.argsort(-le, kind="stable")[:n_best]
    out = []
    for i in starts.tolist():
        for j in ends.tolist():
            if i <= j < i + max_answer_len:
                out.append((float(ls[i] + le[j]), i, j))
    return out


def best_answers(examples, feats, logits, n_best=20, max_answer_len=30):
    """{id: answer text} and {id: n-best list of {text, start, end, score}} (score = probability of the span
    within its window). logits: per feature (start, end) numpy arrays over that feature's positions."""
    cands = collections.defaultdict(list)
    for k, (f, (sl, el)) in enumerate(zip(feats, logits)):
        cs, n = f["ctx_start"], len(f["offsets"])
        null = len(f["ids"]) - 1
        pick = list(range(cs, cs + n)) + [null]
        for score, i, j in window_spans(sl[pick], el[pick], n, n_best, max_answer_len):
            cands[f["example"]].append((-score, k, i, j))
    preds, nbest = {}, {}
    for e, ex in enumerate(examples):
        seen, out = set(), []
        for neg, k, i, j in sorted(cands.get(e, [])):
            s, t = token_to_char(ex["context"], feats[k]["offsets"], i, j)
            if (s, t) in seen:  # the same span from an overlapping window
                continue
            seen.add((s, t))
            out.append({"text": ex["context"][s:t], "start": s, "end": t, "score": math.exp(-neg)})
            if len(out) == n_best:
                break
        nbest[ex["id"]] = out
        preds[ex["id"]] = out[0]["text"] if out else ""
    return preds, nbest


@torch.no_grad()
def qa_logits(model, feats, batch_size=32, padding_side="right"):
    """Per feature (start, end) logits as numpy arrays over its own positions (padding removed)."""
    model.eval()
    out = [None] * len(feats)
    order = sorted(range(len(feats)), key=lambda k: -len(feats[k]["ids"]))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        ids, mask, shift = collate([feats[k]["ids"] for k in idx], padding_side)
        start, end = model(ids, mask)
        for r, k in enumerate(idx):
            s, n = int(shift[r]), len(feats[k]["ids"])
            out[k] = (start[r, s:s + n].cpu().numpy(), end[r, s:s + n].cpu().numpy())
    return out


def predict_qa(model, tok, examples, settings, batch_size=32):
    """(predictions, nbest) for examples with this model and its QA settings (see qa_settings)."""
    feats = qa_features(tok, examples, settings["max_seq_length"], settings["doc_stride"],
                        settings["max_query_length"], settings["markers"])
    logits = qa_logits(model, feats, batch_size, settings["padding_side"])
    return best_answers(examples, feats, logits, settings["n_best"], settings["max_answer_length"])


def qa_loss(model, feats, padding_side):
    ids, mask, shift = collate([f["ids"] for f in feats], padding_side)
    start, end = model(ids, mask)
    allowed = allowed_positions(feats, ids.shape[1], shift).to(start.device)
    ys = (torch.tensor([f["start"] for f in feats]) + shift).to(start.device)
    ye = (torch.tensor([f["end"] for f in feats]) + shift).to(start.device)
    start, end = start.masked_fill(~allowed, float("-inf")), end.masked_fill(~allowed, float("-inf"))
    return (F.cross_entropy(start, ys) + F.cross_entropy(end, ye)) / 2


# ---------------------------------------------------------------------------------------
# sentence-pair data

def read_tsv(path, columns):
    """Rows of a headed TSV written without quoting (csv.QUOTE_NONE: sentences hold bare quotes)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e})")
    if not rows or any(c not in rows[0] for c in columns):
        raise ValueError(f"{path}: expected a header with columns {columns}")
    return rows


def load_pairs(path, task):
    """[(text_a, text_b, target)]: NLI label index or STS score."""
    if task == "classify":
        rows = read_tsv(path, ("premise", "hypothesis", "label"))
        bad = [r["label"] for r in rows if r["label"] not in NLI_LABELS]
        if bad:
            raise ValueError(f"{path}: label {bad[0]!r} is not one of {NLI_LABELS}")
        return [(r["premise"], r["hypothesis"], NLI_LABELS.index(r["label"])) for r in rows]
    rows = read_tsv(path, ("score", "sentence1", "sentence2"))
    return [(r["sentence1"], r["sentence2"], float(r["score"])) for r in rows]


def pair_ids(tok, pairs, max_len=128, markers=False):
    a = tok.encode_batch([p[0] for p in pairs], allow_special=False)
    b = tok.encode_batch([p[1] for p in pairs], allow_special=False)
    half = (max_len - 3) // 2
    if markers:
        return [[Q_MARK, *x[:half], C_MARK, *y[:half], tk.EOS_ID] for x, y in zip(a, b)]
    return [[*x[:half], tk.EOS_ID, *y[:half], tk.EOS_ID] for x, y in zip(a, b)]


@torch.no_grad()
def pair_outputs(model, rows, batch_size=64, padding_side="right"):
    model.eval()
    out = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda k: -len(rows[k]))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        ids, mask, _ = collate([rows[k] for k in idx], padding_side)
        y = model(ids, mask)
        for r, k in enumerate(idx):
            out[k] = y[r].cpu().numpy()
    return np.stack(out)


def pair_metrics(task, outputs, targets):
    import eval_embed
    if task == "classify":
        return {"accuracy": 100.0 * float((outputs.argmax(1) == np.asarray(targets)).mean()), "pairs": len(targets)}
    return {"spearman": 100.0 * eval_embed.spearman(outputs, targets),
            "pearson": 100.0 * eval_embed.pearson(outputs, targets), "pairs": len(targets)}


# ---------------------------------------------------------------------------------------
# training

def batches(lengths, batch_size, rng):
    """Shuffled batches of similar length (sorted inside chunks of 50 batches): little padding, random order."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = 50 * batch_size
    out = []
    for c in range(0, len(order), chunk):
        part = sorted(order[c:c + chunk], key=lambda k: lengths[k])
        out += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(out)
    return out


def train_loop(model, items, loss_fn, args, log):
    """AdamW with linear warmup and decay over --epochs (or --max_steps), stopping early at --max_minutes."""
    rng = random.Random(args.seed)
    per_epoch = math.ceil(len(items) / args.batch_size)
    total = per_epoch * args.epochs if args.max_steps <= 0 else args.max_steps
    warmup = max(1, int(args.warmup * total))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    t0, step, stopped, losses = time.time(), 0, "steps", []
    lengths = [len(x["ids"]) if isinstance(x, dict) else len(x[0]) for x in items]
    while step < total:
        for batch in batches(lengths, args.batch_size, rng):
            if step >= total:
                break
            if args.max_minutes and time.time() - t0 > 60 * args.max_minutes:
                stopped = "time"
                break
            lr = args.lr * min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
            for g in opt.param_groups:
                g["lr"] = lr
            model.train()
            loss = loss_fn([items[k] for k in batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            losses.append(loss.item())
            if step % args.log_interval == 0 or step == total:
                log(f"step {step}/{total} loss {np.mean(losses[-args.log_interval:]):.4f} lr {lr:.2e} "
                    f"{(time.time() - t0) / step:.2f} s/step")
        if stopped == "time":
            break
    return {"steps": step, "planned_steps": total, "stopped_by": stopped, "train_minutes": (time.time() - t0) / 60,
            "first_loss": losses[0] if losses else None,
            "last_loss": float(np.mean(losses[-args.log_interval:])) if losses else None}


# ---------------------------------------------------------------------------------------
# QA export: a directory transformers runs with trust_remote_code (hf_qa.py), which `predict` also reads

def qa_settings(args):
    return {"attn": args.attn, "max_seq_length": args.max_len, "doc_stride": args.doc_stride,
            "max_query_length": args.max_query_len, "max_answer_length": args.max_answer_len,
            "n_best": args.n_best, "markers": bool(args.markers), "padding_side": args.padding_side}


def export_qa(model, out, settings, sources=()):
    """Write the fine-tuned QA model to `out`: weights (embed.*, encoder.*, qa_head.*), config.json with the
    QA settings and auto_map / custom_pipelines for transformers, hf_qa.py, tokenizer files."""
    from safetensors.torch import save_file
    c = model.encoder.cfg
    os.makedirs(out, exist_ok=True)
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("encoder.decoder."):
            k = "encoder." + k[len("encoder.decoder."):]
        elif k.startswith("encoder."):
            k = k[len("encoder."):]  # encoder.embed.weight -> embed.weight
        sd[k] = v.detach().contiguous().cpu()
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config = {
        "model_type": QA_MODEL_TYPE, "architectures": ["Qwen3EncoderForQuestionAnswering"],
        "auto_map": {"AutoConfig": "hf_qa.Qwen3EncoderQAConfig",
                     "AutoModelForQuestionAnswering": "hf_qa.Qwen3EncoderForQuestionAnswering"},
        "custom_pipelines": {"question-answering": {"impl": "hf_qa.Qwen3EncoderQAPipeline",
                                                    "pt": ["AutoModelForQuestionAnswering"]}},
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_seq_len,
        "pad_token_id": tk.PAD_ID, "eos_token_id": tk.EOS_ID, "marker_ids": [Q_MARK, C_MARK],
        **settings, "finetuned_from": [os.path.abspath(s) for s in sources],
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shutil.copy(os.path.join(HERE, "hf_qa.py"), os.path.join(out, "hf_qa.py"))
    tok = tk.load_tokenizer()
    tok.save_hf(out, model_max_length=settings["max_seq_length"])
    tc_path = os.path.join(out, "tokenizer_config.json")
    with open(tc_path) as f:
        tc = json.load(f)
    tc["padding_side"] = settings["padding_side"]
    with open(tc_path, "w") as f:
        json.dump(tc, f, indent=2)


def load_qa(path):
    """(TaskModel, settings) of a directory export_qa wrote."""
    from safetensors.torch import load_file
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"--model {path}: no config.json; pass a directory `finetune.py qa` wrote")
    with open(cfg_path) as f:
        d = json.load(f)
    if d.get("model_type") != QA_MODEL_TYPE:
        raise ValueError(f"{cfg_path}: model_type {d.get('model_type')!r}, not {QA_MODEL_TYPE!r}")
    model = TaskModel(load_encoder(path), "qa", attn=d["attn"])
    head = load_file(os.path.join(path, "model.safetensors"))
    model.qa_head.load_state_dict({"weight": head["qa_head.weight"], "bias": head["qa_head.bias"]})
    keys = ("attn", "max_seq_length", "doc_stride", "max_query_length", "max_answer_length", "n_best", "markers",
            "padding_side")
    return model.eval(), {k: d[k] for k in keys}


# ---------------------------------------------------------------------------------------
# commands

def shared_path(*parts):
    return os.path.join(os.environ.get("QWEN_ENCDEC_SHARED_DATA", os.path.join(HERE, "..", "shared", "data")),
                        *parts)


def subsample(items, n, seed):
    if n and n < len(items):
        return random.Random(seed).sample(items, n)
    return items


def run_task(args):
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = tk.load_tokenizer()
    encoder = load_encoder(args.init)
    lines = []

    def log(msg):  # --out (and its log.txt) appears only once the model and the data have loaded
        print(msg, flush=True)
        lines.append(msg)
        if os.path.isdir(args.out):
            with open(os.path.join(args.out, "log.txt"), "w") as f:
                f.write("\n".join(lines) + "\n")

    if args.markers:
        init_marker_rows(encoder)
    encoder.set_dropout(attn=args.dropout, hidden=args.dropout)
    if args.freeze_embed:  # a laptop model's 152K-row embedding is most of its parameters: skip their updates
        encoder.embed.weight.requires_grad_(False)
    task = {"qa": "qa", "nli": "classify", "sts": "regress"}[args.command]
    model = TaskModel(encoder, task, args.attn, args.pooling, dropout=args.dropout).to(args.device)
    log(f"{args.command}: init {args.init} ({encoder.cfg.num_layers} layers, hidden {encoder.cfg.hidden_size}), "
        f"attn {args.attn}, pooling {args.pooling}, dropout {args.dropout}, padding {args.padding_side}")
    result = {"task": args.command, "init": os.path.abspath(args.init), "settings": vars(args)}
    if task == "qa":
        data, examples = load_squad(args.train or shared_path("qa", "squad_train_subset_v1.1.json"),
                                    args.evidence_threshold)
        if args.val:
            train_ex, (val_data, val_ex) = examples, load_squad(args.val, args.evidence_threshold)
        else:
            _, val_articles = split_articles(data)
            val_titles = {a["title"] for a in val_articles}
            val_ex = [e for e in examples if data[e["article"]]["title"] in val_titles]
            train_ex = [e for e in examples if data[e["article"]]["title"] not in val_titles]
            val_data = val_articles
        train_ex = [e for e in subsample(train_ex, args.max_train, args.seed) if e["answers"]]
        val_ex = subsample(val_ex, args.max_eval, args.seed + 1)
        keep = {e["id"] for e in val_ex}
        val_data = [{"paragraphs": [{"qas": [q for q in p["qas"] if q["id"] in keep]} for p in a["paragraphs"]]}
                    for a in val_data]
        settings = qa_settings(args)
        feats = qa_features(tok, train_ex, args.max_len, args.doc_stride, args.max_query_len, args.markers)
        os.makedirs(args.out, exist_ok=True)
        log(f"train: {len(train_ex)} questions, {len(feats)} windows; val: {len(val_ex)} questions")
        result["train"] = train_loop(model, feats, lambda fs: qa_loss(model, fs, args.padding_side), args, log)
        preds, nbest = predict_qa(model, tok, val_ex, settings, args.eval_batch_size)
        result["val"] = {**squad_scores(val_data, preds), "questions": len(val_ex)}
        export_qa(model, args.out, settings, [args.init])
        with open(os.path.join(args.out, "val_predictions.json"), "w") as f:
            json.dump(preds, f, indent=1)
    else:
        train = load_pairs(args.train or shared_path(*(("nli", "snli_train_subset.tsv") if task == "classify"
                                                      else ("sts", "stsb_train.tsv"))), task)
        val = load_pairs(args.val or shared_path(*(("nli", "snli_dev.tsv") if task == "classify"
                                                  else ("sts", "stsb_dev.tsv"))), task)
        train, val = subsample(train, args.max_train, args.seed), subsample(val, args.max_eval, args.seed + 1)
        items = list(zip(pair_ids(tok, train, args.max_len, args.markers), [p[2] for p in train]))
        val_rows = pair_ids(tok, val, args.max_len, args.markers)
        os.makedirs(args.out, exist_ok=True)
        log(f"train: {len(train)} pairs; val: {len(val)} pairs")

        def loss_fn(batch):
            ids, mask, _ = collate([x for x, _ in batch], args.padding_side)
            y = model(ids, mask)
            if task == "classify":
                return F.cross_entropy(y, torch.tensor([t for _, t in batch], device=y.device))
            return F.mse_loss(y, torch.tensor([t / 5.0 for _, t in batch], device=y.device))

        result["train"] = train_loop(model, items, loss_fn, args, log)
        outputs = pair_outputs(model, val_rows, args.eval_batch_size, args.padding_side)
        result["val"] = pair_metrics(task, outputs, [p[2] for p in val])
        from safetensors.torch import save_file
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                  os.path.join(args.out, "model.safetensors"))
    log("val: " + json.dumps(result["val"]))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("qa", "nli", "sts"):
        s = sub.add_parser(name)
        s.add_argument("--init", required=True, help="extract.py dir, UL2 checkpoint/out_dir, or HF Qwen3 dir")
        s.add_argument("--out", required=True)
        s.add_argument("--train", help="training file (default: the shared data set of the task)")
        s.add_argument("--val", help="validation file (default: qa: every 10th article of --train; "
                                     "nli: snli_dev.tsv; sts: stsb_dev.tsv)")
        s.add_argument("--attn", default="bidirectional", choices=["bidirectional", "causal"])
        s.add_argument("--pooling", default="mean", choices=POOLINGS, help="nli/sts only")
        s.add_argument("--dropout", type=float, default=0.1)
        s.add_argument("--padding_side", default="right", choices=["right", "left"])
        s.add_argument("--markers", action="store_true", help="mark the two parts with unused Qwen3 rows")
        s.add_argument("--max_len", type=int, default=384 if name == "qa" else 128)
        s.add_argument("--doc_stride", type=int, default=128)
        s.add_argument("--max_query_len", type=int, default=64)
        s.add_argument("--max_answer_len", type=int, default=30)
        s.add_argument("--n_best", type=int, default=20)
        s.add_argument("--evidence_threshold", type=float, default=0.8)
        s.add_argument("--freeze_embed", action="store_true", help="do not train the embedding matrix")
        s.add_argument("--lr", type=float, default=1e-4)
        s.add_argument("--weight_decay", type=float, default=0.01)
        s.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps")
        s.add_argument("--epochs", type=int, default=1)
        s.add_argument("--max_steps", type=int, default=0, help="> 0 overrides --epochs")
        s.add_argument("--max_minutes", type=float, default=0, help="stop training after this long (0: no limit)")
        s.add_argument("--batch_size", type=int, default=16)
        s.add_argument("--eval_batch_size", type=int, default=32)
        s.add_argument("--max_train", type=int, default=0, help="use a random subset of the training examples")
        s.add_argument("--max_eval", type=int, default=0, help="use a random subset of the validation examples")
        s.add_argument("--log_interval", type=int, default=20)
        s.add_argument("--threads", type=int, default=0)
        s.add_argument("--device", default="cpu", help="cpu, cuda, ... (fp32 throughout)")
        s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("predict", help="answer every question of a SQuAD file with a QA directory")
    s.add_argument("--model", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True, help="predictions JSON (id -> answer); the n-best go to OUT.nbest.json")
    s.add_argument("--batch_size", type=int, default=32)
    s = sub.add_parser("score", help="SQuAD v1.1 EM/F1 of a predictions file (as the official script)")
    s.add_argument("data")
    s.add_argument("predictions")
    args = p.parse_args(argv)
    try:
        if args.command == "score":
            with open(args.data, encoding="utf-8") as f:
                data = json.load(f)
            if "data" not in data:
                raise ValueError(f"{args.data}: no 'data' list; not a SQuAD file")
            with open(args.predictions, encoding="utf-8") as f:
                preds = json.load(f)
            if not isinstance(preds, dict):
                raise ValueError(f"{args.predictions}: expected a JSON object question id -> answer text")
            print(json.dumps(squad_scores(data["data"], preds)))
        elif args.command == "predict":
            model, settings = load_qa(args.model)
            data, examples = load_squad(args.data)
            preds, nbest = predict_qa(model, tk.load_tokenizer(), examples, settings, args.batch_size)
            for path, obj in ((args.out, preds), (args.out + ".nbest.json", nbest)):
                checkpoint.write_json(path, obj)
            if any(e["answers"] for e in examples):
                print(json.dumps(squad_scores(data, preds)))
        else:
            if args.max_len < 8:
                raise ValueError(f"--max_len {args.max_len}: too short")
            run_task(args)
    except (OSError, ValueError) as e:
        fail(str(e))


if __name__ == "__main__":
    main()
