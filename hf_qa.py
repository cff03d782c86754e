"""Extractive question answering with a Qwen3-style encoder, for transformers (trust_remote_code).
Self-contained on purpose: finetune.py copies this file into every QA directory it writes, which must load
without this project.

    from transformers import pipeline
    qa = pipeline("question-answering", model=DIR, trust_remote_code=True)
    qa(question="Who wrote it?", context="It was written by Ann.")   # {"answer", "start", "end", "score"}

    model = AutoModelForQuestionAnswering.from_pretrained(DIR, trust_remote_code=True)
    model(input_ids, attention_mask).start_logits / .end_logits          # [B, T]

The model: Qwen3 blocks (pre-RMSNorm, grouped-query attention with per-head RMSNorm on queries and keys,
rotary positions counting real tokens only, SwiGLU) run with the attention the model was fine-tuned with
(config.attn: "bidirectional" = padding mask only, or "causal"), then Linear(hidden, 2).

The pipeline builds its inputs and reads its answers exactly as finetune.py does (transformers 5 dropped its
own question-answering pipeline, so this file brings one): the context is tokenized with character offsets
and punctuation runs ("%).") and punctuation-led words ("-five") split, so answers can end where a word
does; input = question <|endoftext|> context-window <|endoftext|> (or marker rows around question and
context); windows of max_seq_length tokens overlapping by doc_stride; per window the n_best starts x ends,
spans of at most max_answer_length tokens, scored by log p(start) + log p(end) under a softmax over the
window's context tokens and its final (null) token; the best span over all windows, without the whitespace
at its edges.
"""
import math
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Pipeline, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import QuestionAnsweringModelOutput


class Qwen3EncoderQAConfig(PretrainedConfig):
    model_type = "qwen3_encoder_qa"

    def __init__(self, vocab_size=152036, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0,
                 rms_norm_eps=1e-6, max_position_embeddings=40960, attn="bidirectional", max_seq_length=384,
                 doc_stride=128, max_query_length=64, max_answer_length=30, n_best=20, markers=False,
                 marker_ids=(151672, 151673), padding_side="right", pad_token_id=151643, eos_token_id=151643,
                 **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.head_dim = num_key_value_heads, head_dim
        self.rope_theta, self.rms_norm_eps = rope_theta, rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.attn, self.max_seq_length, self.doc_stride = attn, max_seq_length, doc_stride
        self.max_query_length, self.max_answer_length, self.n_best = max_query_length, max_answer_length, n_best
        self.markers, self.marker_ids, self.padding_side = markers, list(marker_ids), padding_side
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kwargs)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary(T, head_dim, theta, device):
    """cos, sin [T, head_dim] (fp32) for positions 0..T-1."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c, hd = cfg.hidden_size, cfg.head_dim
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(c, self.n_head * hd, bias=False)
        self.k_proj = nn.Linear(c, self.n_kv * hd, bias=False)
        self.v_proj = nn.Linear(c, self.n_kv * hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * hd, c, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.hd)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        rep = self.n_head // self.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


class Stack(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3EncoderForQuestionAnswering(PreTrainedModel):
    config_class = Qwen3EncoderQAConfig
    base_model_prefix = "qwen3_encoder_qa"
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.encoder = Stack(config)
        self.qa_head = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def forward(self, input_ids, attention_mask=None, **kwargs):
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        real = attention_mask.bool()
        keys = real[:, None, :].expand(B, T, T)
        if self.config.attn == "causal":
            keys = keys & torch.ones(T, T, dtype=torch.bool, device=real.device).tril()
        # a padding query that would see no key sees itself (finite softmax; its output is never read)
        mask = (keys | torch.eye(T, dtype=torch.bool, device=real.device))[:, None]
        x = self.embed(input_ids)
        pos = (real.long().cumsum(-1) - 1).clamp(min=0)  # positions count real tokens: padding side is free
        cos, sin = rotary(T, self.config.head_dim, self.config.rope_theta, input_ids.device)
        cos, sin = cos[pos][:, None].to(x.dtype), sin[pos][:, None].to(x.dtype)
        for block in self.encoder.layers:
            x = block(x, cos, sin, mask)
        start, end = self.qa_head(self.encoder.norm(x)).float().unbind(-1)
        return QuestionAnsweringModelOutput(start_logits=start, end_logits=end)


# ---------------------------------------------------------------------------------------
# inputs and answers (the same rules as finetune.py)

SPLIT_RUN = re.compile(r"^ ?[^\s\w]{2,}$")
SPLIT_LED = re.compile(r"^[^\s\w]\w+$")


def _encode(tokenizer, texts, offsets=False):
    enc = tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True,
                    return_offsets_mapping=offsets)
    if offsets:
        return [(ids, [tuple(o) for o in off]) for ids, off in zip(enc["input_ids"], enc["offset_mapping"])]
    return enc["input_ids"]


def encode_context(tokenizer, text):
    """(ids, character offsets) of a context; punctuation runs and punctuation-led words split."""
    (ids, offsets), = _encode(tokenizer, [text], offsets=True)
    out_ids, out_off = [], []
    for t, (s, e) in zip(ids, offsets):
        piece = text[s:e]
        parts = None
        if SPLIT_RUN.match(piece):
            lead = 2 if piece[0] == " " else 1
            parts = [piece[:lead], *piece[lead:]]
        elif SPLIT_LED.match(piece):
            parts = [piece[0], piece[1:]]
        if parts is None or _encode(tokenizer, [piece])[0] != [t]:
            out_ids.append(t)
            out_off.append((s, e))
            continue
        at = s
        for part, (p_ids, p_off) in zip(parts, _encode(tokenizer, parts, offsets=True)):
            out_ids += p_ids
            out_off += [(at + a, at + b) for a, b in p_off]
            at += len(part)
    return out_ids, out_off


def windows(n, room, stride):
    if room <= stride:
        raise ValueError(f"max_seq_length leaves {room} context tokens per window, not more than doc_stride {stride}")
    out, s = [], 0
    while True:
        out.append((s, min(s + room, n)))
        if s + room >= n:
            return out
        s += room - stride


def _log_softmax(x):
    x = x.astype(np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


class Qwen3EncoderQAPipeline(Pipeline):
    """pipeline("question-answering", model=DIR, trust_remote_code=True)(question=..., context=...)."""

    def __call__(self, *args, question=None, context=None, **kwargs):
        if question is not None:
            if isinstance(question, (list, tuple)):
                return [super(Qwen3EncoderQAPipeline, self).__call__({"question": q, "context": c}, **kwargs)
                        for q, c in zip(question, context)]
            return super().__call__({"question": question, "context": context}, **kwargs)
        return super().__call__(*args, **kwargs)

    def _sanitize_parameters(self, top_k=None, max_answer_len=None, **kwargs):
        post = {}
        if top_k is not None:
            post["top_k"] = int(top_k)
        if max_answer_len is not None:
            post["max_answer_len"] = int(max_answer_len)
        return {}, {}, post

    def preprocess(self, inputs):
        c = self.model.config
        question, context = inputs["question"], inputs["context"]
        q_ids = _encode(self.tokenizer, [question])[0][:c.max_query_length]
        eos = c.eos_token_id
        prefix = [c.marker_ids[0], *q_ids, c.marker_ids[1]] if c.markers else [*q_ids, eos]
        ids, offsets = encode_context(self.tokenizer, context)
        rows, spans = [], []
        for s, e in windows(len(ids), c.max_seq_length - len(prefix) - 1, c.doc_stride):
            rows.append(prefix + ids[s:e] + [eos])
            spans.append((s, e))
        T = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), T), c.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        shifts = []
        for b, r in enumerate(rows):
            s = T - len(r) if c.padding_side == "left" else 0
            input_ids[b, s:s + len(r)] = torch.tensor(r)
            mask[b, s:s + len(r)] = 1
            shifts.append(s)
        return {"input_ids": input_ids, "attention_mask": mask, "context": context, "offsets": offsets,
                "spans": spans, "shifts": shifts, "lengths": [len(r) for r in rows], "ctx_start": len(prefix)}

    def _forward(self, inputs):
        out = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        keep = ("context", "offsets", "spans", "shifts", "lengths", "ctx_start")
        return {"start_logits": out.start_logits, "end_logits": out.end_logits, **{k: inputs[k] for k in keep}}

    def postprocess(self, out, top_k=1, max_answer_len=None):
        c = self.model.config
        max_len = max_answer_len or c.max_answer_length
        context, offsets, cs = out["context"], out["offsets"], out["ctx_start"]
        cands = []
        for k, ((s, e), shift, length) in enumerate(zip(out["spans"], out["shifts"], out["lengths"])):
            n = e - s
            pick = list(range(shift + cs, shift + cs + n)) + [shift + length - 1]
            ls = _log_softmax(out["start_logits"][k].float().numpy()[pick])[:n]
            le = _log_softmax(out["end_logits"][k].float().numpy()[pick])[:n]
            starts = np.argsort(-ls, kind="stable")[:c.n_best].tolist()
            ends = np.argsort(-le, kind="stable")[:c.n_best].tolist()
            for i in starts:
                for j in ends:
                    if i <= j < i + max_len:
                        cands.append((-float(ls[i] + le[j]), k, i, j))
        answers, seen = [], set()
        for neg, k, i, j in sorted(cands):
            s0 = out["spans"][k][0]
            a, b = offsets[s0 + i][0], offsets[s0 + j][1]
            while a < b and context[a].isspace():
                a += 1
            while b > a and context[b - 1].isspace():
                b -= 1
            if (a, b) in seen:
                continue
            seen.add((a, b))
            answers.append({"score": math.exp(-neg), "start": a, "end": b, "answer": context[a:b]})
            if len(answers) == top_k:
                break
        if not answers:
            answers = [{"score": 0.0, "start": 0, "end": 0, "answer": ""}]
        return answers[0] if top_k == 1 else answers
