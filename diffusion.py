"""Masked-diffusion language modelling on the bidirectional Qwen3 stack (LLaDA-style).

The decoder-only Qwen3 with its causal mask removed reads a sequence in which some tokens are replaced by
MASK_ID and predicts every masked token at once with its tied LM head; nothing is added to the model.

    forward process   noise_rows: t ~ U(0, 1) per sequence, p_mask = (1 - eps) * rate(t) + eps, each token
                      masked independently with p_mask (schedules, random replacement, contiguous spans)
    losses            weighted_ce on per-token weights the batch carries (llada / dllm / soft_ce / sft)
    SFT               read_conversations, sft_examples: the prompt is never noised, EOS padding is trained
    block attention   block_attention_mask: one function for training and sampling
    sampler           generate: LLaDA's reverse process (low-confidence remasking, blocks, CFG), plus
                      confidence-threshold decoding and a per-block prefix key-value cache (Fast-dLLM)
    training          Objective + CONFIG: the train.py objective interface (objective='diffusion')

`model` everywhere is the project's Qwen3 or any callable (ids, attention_mask) -> logits [B, T, V].
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels
from tokenizer import EOS_ID, IGNORE_INDEX

# the first of Qwen3's embedding rows its tokenizer never emits (151672..151935; 151669..151671 are the UL2
# mode tokens): a mask token that costs no new row and can never collide with text
MASK_ID = 151672
EOT_ID = 151645        # <|im_end|>: the end of a chat turn
IM_START_ID = 151644   # <|im_start|>
EPS = 1e-3             # LLaDA's floor on p_mask: no sequence goes unmasked, and 1/p_mask stays <= 1000
SCHEDULES = ("uniform", "cosine", "power", "sigmoid")
LOSSES = ("llada", "dllm", "soft_ce")


# ---------------------------------------------------------------------------------------
# forward process

def mask_rate(t, schedule="uniform", power=2.0, sigmoid_k=10.0):
    """Masked fraction as a function of the diffusion time t in [0, 1]: 0 at t=0, 1 at t=1, increasing."""
    t = np.asarray(t, dtype=np.float64)
    if schedule == "uniform":
        return t
    if schedule == "cosine":  # MaskGIT's: few masks for most of the early times, then fast
        return 1.0 - np.cos(0.5 * np.pi * t)
    if schedule == "power":
        return t ** power
    if schedule == "sigmoid":  # a logistic curve through (0.5, 0.5) rescaled to reach 0 and 1 exactly
        lo, hi = 1 / (1 + math.exp(sigmoid_k / 2)), 1 / (1 + math.exp(-sigmoid_k / 2))
        return (1 / (1 + np.exp(-sigmoid_k * (t - 0.5))) - lo) / (hi - lo)
    raise ValueError(f"diffusion_schedule={schedule!r}; choose one of {', '.join(SCHEDULES)}")


def noise_rows(ids, rng, maskable=None, *, eps=EPS, schedule="uniform", power=2.0, sigmoid_k=10.0,
               t_low=0.0, t_high=1.0, min_rate=0.0, contiguous_prob=0.0, noise_type="mask", mask_id=MASK_ID):
    """The forward process on a batch of rows -> (noisy ids, noised bool [B, T], p_mask [B]).

    Per row t ~ U(t_low, t_high), p_mask = max((1 - eps) * rate(t) + eps, min_rate). Each maskable token is
    noised independently with p_mask, or, with probability contiguous_prob, one contiguous run of
    round(p_mask * n) maskable positions is (n = maskable tokens of the row; at least one). noise_type 'mask'
    writes mask_id; 'random_replace' writes a token drawn from the batch's own tokens (the unigram
    distribution of the data: it never writes an id the corpus lacks, so a trimmed vocabulary still holds it)."""
    ids = np.asarray(ids, dtype=np.int64)
    B, T = ids.shape
    maskable = np.ones((B, T), dtype=bool) if maskable is None else np.asarray(maskable, dtype=bool)
    t = rng.uniform(t_low, t_high, size=B)
    p = np.maximum((1 - eps) * mask_rate(t, schedule, power, sigmoid_k) + eps, min_rate)
    noised = (rng.random((B, T)) < p[:, None]) & maskable
    for b in np.flatnonzero(rng.random(B) < contiguous_prob):
        where = np.flatnonzero(maskable[b])
        if len(where) == 0:
            continue
        n = min(max(int(round(p[b] * len(where))), 1), len(where))
        start = int(rng.integers(0, len(where) - n + 1))
        noised[b] = False
        noised[b, where[start:start + n]] = True
    noisy = ids.copy()
    if noise_type == "mask":
        noisy[noised] = mask_id
    elif noise_type == "random_replace":
        pool = ids[maskable] if maskable.any() else ids.ravel()
        noisy[noised] = pool[rng.integers(0, len(pool), size=int(noised.sum()))]
    else:
        raise ValueError(f"diffusion_noise_type={noise_type!r}; choose mask or random_replace")
    return noisy, noised, p


def shorten_rows(attn, rng, prob=0.01):
    """LLaDA cuts 1 % of its batches to a random length in [1, L] so the model also sees short sequences.
    Here each row is cut with probability `prob` (right padding: attention mask False, nothing scored), which
    keeps row k of the run the same whatever the batch split. Returns the cut lengths (L = not cut)."""
    B, T = attn.shape
    lengths = np.full(B, T, dtype=np.int64)
    cut = rng.random(B) < prob
    lengths[cut] = rng.integers(1, T + 1, size=int(cut.sum()))
    attn &= np.arange(T)[None, :] < lengths[:, None]
    return lengths


def loss_weights(noised, p, kind, reweight_cap=0.0, per_row=None):
    """Per-token weights [B, T] of the cross-entropy at noised positions, and the units per row [B].

    llada / soft_ce   1 / p_mask (capped at reweight_cap when > 0); units: the row's tokens (per_row), so
                      the sum over the global batch divided by the units is LLaDA's  sum CE / p  /  (b * l)
    dllm              1 / (masked tokens of the row): the mean CE of each sequence; units: sequences"""
    B, T = noised.shape
    if kind in ("llada", "soft_ce"):
        w = 1.0 / p
        if reweight_cap > 0:
            w = np.minimum(w, reweight_cap)
        units = np.full(B, T, np.float64) if per_row is None else per_row.astype(np.float64)
        return (noised * w[:, None]).astype(np.float32), units.astype(np.float32)
    if kind == "dllm":
        n = noised.sum(1)
        w = np.where(n > 0, 1.0 / np.maximum(n, 1), 0.0)
        return (noised * w[:, None]).astype(np.float32), (n > 0).astype(np.float32)
    raise ValueError(f"diffusion_loss={kind!r}; choose one of {', '.join(LOSSES)}")


# ---------------------------------------------------------------------------------------
# cross-entropy in fp32 on the scored positions only

def weighted_ce(hidden, weight, labels, token_weights, smoothing=0.0, chunk_rows=None):
    """sum_i w_i * CE(hidden_i @ weight.T, labels_i) in fp32, chunk by chunk: each chunk's logits are
    recomputed in the backward (checkpoint), so at most one chunk of [rows, V] logits exists at a time."""
    n, V = hidden.shape[0], weight.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    if n == 0:
        return total + 0.0 * hidden.sum() + 0.0 * weight.sum()  # keeps the graph (DDP wants every gradient)
    chunk_rows = chunk_rows or max(1, (1 << 28) // (4 * V))  # ~256 MB of fp32 logits per chunk

    def chunk_loss(h, w, y, tw):
        logits = F.linear(h, w).float()
        ce = F.cross_entropy(logits, y, reduction="none", label_smoothing=smoothing)
        return (ce * tw.float()).sum()

    for s in range(0, n, chunk_rows):
        args = (hidden[s:s + chunk_rows], weight, labels[s:s + chunk_rows], token_weights[s:s + chunk_rows])
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            total = total + checkpoint(chunk_loss, *args, use_reentrant=False)
        else:
            total = total + chunk_loss(*args)
    return total


def _sharded(model):
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def _plain_qwen3(model):
    """The model itself when it is our Qwen3 (or alike) and unwrapped: then the loss runs the hidden states
    and the head on scored positions only. DDP and FSDP must be called through forward(): DDP prepares its
    gradient reduction there, and FSDP gathers the root's parameters (the embedding) in its forward hook."""
    ok = hasattr(model, "hidden") and hasattr(model, "head_weight") and not _sharded(model)
    return model if ok else None


def model_logits(model, ids, attention_mask=None, attn_mask=None):
    """Full logits [B, T, V] of the bidirectional model (our Qwen3, a wrapper of it, or a toy callable)."""
    if hasattr(model, "hidden") or hasattr(getattr(model, "module", None), "hidden"):
        return model(ids, attention_mask=attention_mask, attn="bidirectional", attn_mask=attn_mask)[0]
    return model(ids, attention_mask if attn_mask is None else attn_mask)


def diffusion_loss(model, batch, smoothing=0.0, attn_mask=None):
    """(sum of weighted CE over scored tokens, units) for a batch of torch tensors: ids, labels (IGNORE_INDEX
    where unscored), weight [B, T], count [B], optional mask [B, T] (attention padding)."""
    ids, labels, w = batch["ids"], batch["labels"], batch["weight"]
    am = batch.get("mask")
    sel = labels != IGNORE_INDEX
    q = _plain_qwen3(model)
    if q is not None:
        h = q.hidden(ids, am, attn="bidirectional", attn_mask=attn_mask)
        loss = weighted_ce(h[sel], q.head_weight, labels[sel], w[sel], smoothing)
    else:
        logits = model_logits(model, ids, am, attn_mask)
        loss = _logits_ce(logits[sel], labels[sel], w[sel], smoothing)
    return loss, batch["count"].float().sum()


def _logits_ce(logits, labels, w, smoothing):
    ce = F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=smoothing)
    return (ce * w.float()).sum()


# ---------------------------------------------------------------------------------------
# block attention: one function for training and sampling

def block_attention_mask(prompt_len, T, block_length, see_earlier=True, key_mask=None, device=None):
    """bool [B, T, T], True = query t may attend key s. Prompt tokens (t < prompt_len) see the prompt only;
    answer block j (positions prompt_len + j*block_length ...) sees the prompt and itself, and with
    see_earlier the answer blocks before it. key_mask [B, T] (True = real token) removes padding keys; a
    query left with no key (padding) sees itself, so softmax stays finite."""
    device = device or (key_mask.device if key_mask is not None else None)
    prompt_len = torch.as_tensor(prompt_len, device=device).long().reshape(-1, 1)   # [B or 1, 1]
    rel = torch.arange(T, device=device)[None, :] - prompt_len
    blk = torch.where(rel < 0, torch.full_like(rel, -1), torch.div(rel, block_length, rounding_mode="floor"))
    q, k = blk[:, :, None], blk[:, None, :]
    allowed = (k <= q) if see_earlier else ((k == -1) | (k == q))
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, :]
        allowed = allowed | torch.eye(T, dtype=torch.bool, device=device)[None]
    return allowed


def full_attention_mask(key_mask, T=None):
    """The bidirectional structure as an explicit [B, T, T] mask (padding keys removed, self always seen)."""
    B, T = key_mask.shape
    return key_mask.bool()[:, None, :].expand(B, T, T) | torch.eye(T, dtype=torch.bool, device=key_mask.device)


# ---------------------------------------------------------------------------------------
# SFT: conversations -> (prompt, answer) pairs -> fixed-length rows

def read_conversations(path):
    """A JSONL file of {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...],
    "system": optional} -> list of (system, [(human, gpt), ...]). A bad record raises ValueError naming the
    file and line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg}); one conversation record per line") from None
            turns = rec.get("conversations") if isinstance(rec, dict) else None
            if not isinstance(turns, list) or not turns:
                raise ValueError(f"{where}: no 'conversations' list; expected "
                                 '{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}')
            system = rec.get("system") or ""
            if not isinstance(system, str):
                raise ValueError(f"{where}: 'system' must be a string")
            pairs = []
            for i, turn in enumerate(turns):
                want = "human" if i % 2 == 0 else "gpt"
                if not isinstance(turn, dict) or turn.get("from") != want or not isinstance(turn.get("value"), str):
                    raise ValueError(f"{where}: turn {i} must be {{\"from\": \"{want}\", \"value\": <string>}} "
                                     "(turns alternate human, gpt, starting with human)")
                if want == "gpt":
                    pairs.append((turns[i - 1]["value"], turn["value"]))
            if len(turns) % 2:
                raise ValueError(f"{where}: the last turn is a human turn with no gpt answer")
            out.append((system, pairs))
    return out


def chat_ids(tok, system, history, question):
    """Qwen3's chat template as ids: [system], earlier (human, gpt) turns, the question, the assistant header.
    Text goes through the BPE with special tokens kept as text, so a user cannot inject a turn marker."""
    nl = tok.encode("\n", allow_special=False)

    def turn(role, text):
        return [IM_START_ID] + tok.encode(f"{role}\n{text}", allow_special=False) + [EOT_ID] + nl

    ids = turn("system", system) if system else []
    for h, g in history:
        ids += turn("user", h) + turn("assistant", g)
    return ids + turn("user", question) + [IM_START_ID] + tok.encode("assistant\n", allow_special=False)


def sft_examples(conversations, tok, seq_len):
    """(ids int32 [N, seq_len], prompt_len int64 [N], dropped): each answer of each conversation becomes one
    single-turn pair whose prompt holds the system prompt and the turns before it; the answer ends with
    <|im_end|> and is padded with EOS to seq_len (the padding is part of the answer: the model learns where to
    stop). Pairs that do not fit seq_len are dropped and counted."""
    rows, plens, dropped = [], [], 0
    for system, pairs in conversations:
        for k, (question, answer) in enumerate(pairs):
            prompt = chat_ids(tok, system, pairs[:k], question)
            ans = tok.encode(answer, allow_special=False) + [EOT_ID]
            if len(prompt) + len(ans) > seq_len:
                dropped += 1
                continue
            rows.append(prompt + ans + [EOS_ID] * (seq_len - len(prompt) - len(ans)))
            plens.append(len(prompt))
    ids = np.array(rows, dtype=np.int32).reshape(-1, seq_len)
    return ids, np.array(plens, dtype=np.int64), dropped


def sft_rows(ids, prompt_len, rng_for_row, first, *, loss_kind="llada", reweight_cap=0.0, **noise):
    """Training rows of SFT examples: the prompt is never noised; the weight of a noised answer token is
    1 / (p_mask * answer length), so a row's loss is its answer's mean (LLaDA's SFT loss); units: rows."""
    B, T = ids.shape
    out_ids, noised, p = [], [], []
    for b in range(B):
        maskable = (np.arange(T) >= prompt_len[b])[None]
        n_ids, n_mask, n_p = noise_rows(ids[b:b + 1], rng_for_row(first + b), maskable, **noise)
        out_ids.append(n_ids[0]); noised.append(n_mask[0]); p.append(n_p[0])
    noised, p = np.stack(noised), np.array(p)
    ans_len = (T - prompt_len).astype(np.float64)
    if loss_kind == "dllm":
        w, units = loss_weights(noised, p, "dllm")
    else:
        inv = 1.0 / p if reweight_cap <= 0 else np.minimum(1.0 / p, reweight_cap)
        w, units = (noised * (inv / ans_len)[:, None]).astype(np.float32), np.ones(B, np.float32)
    labels = np.where(noised, ids, IGNORE_INDEX).astype(np.int64)
    return {"ids": np.stack(out_ids).astype(np.int64), "labels": labels, "weight": w, "count": units,
            "mask": np.ones((B, T), dtype=bool), "prompt_len": prompt_len.astype(np.int64)}


# ---------------------------------------------------------------------------------------
# Monte-Carlo conditional log-likelihood (LLaDA's estimate of log p(answer | prompt))

def mc_rows(ids, prompt_len, rng, mask_id=MASK_ID):
    """One noised copy per row for the Monte-Carlo estimate: l ~ U{1..L} answer tokens masked uniformly at
    random (L = answer length), weight L / l: the weighted CE sum is an unbiased estimate of LLaDA's bound on
    -log p(answer | prompt); units: answer tokens, so the group reports a per-token conditional NLL."""
    ids = np.asarray(ids, dtype=np.int64)
    B, T = ids.shape
    noisy, w = ids.copy(), np.zeros((B, T), np.float32)
    labels = np.full((B, T), IGNORE_INDEX, np.int64)
    units = np.zeros(B, np.float32)
    for b in range(B):
        P = int(prompt_len[b])
        L = T - P
        l = int(rng.integers(1, L + 1))
        pos = P + rng.permutation(L)[:l]
        noisy[b, pos] = mask_id
        labels[b, pos] = ids[b, pos]
        w[b, pos] = L / l
        units[b] = L
    return noisy, labels, w, units


@torch.no_grad()
def mc_log_likelihood(model, prompt, answer, mc_num=64, batch_size=16, mask_id=MASK_ID, seed=0):
    """LLaDA's Monte-Carlo estimate of log p(answer | prompt) (a lower bound in expectation) for one pair of
    1-D id tensors: the mean over mc_num draws of -(L / l) * sum of the masked answer tokens' CE, with l
    stratified over 1..L across the draws (lower variance than i.i.d. l)."""
    seq = torch.cat([prompt, answer]).long()
    P, L = len(prompt), len(answer)
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    start = int(torch.randint(1, L + 1, (), generator=g))
    draws = [((start - 1 + round(k * L / mc_num)) % L) + 1 for k in range(mc_num)]  # stratified l values
    for s in range(0, mc_num, batch_size):
        ls = draws[s:s + batch_size]
        x = seq.repeat(len(ls), 1)
        masked = torch.zeros_like(x, dtype=torch.bool)
        for i, l in enumerate(ls):
            masked[i, P + torch.randperm(L, generator=g)[:l]] = True
        x[masked] = mask_id
        logits = model_logits(model, x.to(_device(model)))
        ce = F.cross_entropy(logits.float()[masked.to(logits.device)], seq.repeat(len(ls), 1)[masked].to(logits.device),
                             reduction="none")
        scale = torch.tensor([L / l for l in ls], dtype=torch.float32, device=logits.device)
        row = torch.zeros(len(ls), device=logits.device).index_add_(
            0, masked.nonzero()[:, 0].to(logits.device), ce)
        total += float((row * scale).sum())
    return -total / mc_num


def _device(model):
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


# ---------------------------------------------------------------------------------------
# sampler: LLaDA's reverse process, plus threshold decoding and a per-block prefix cache

def num_transfer_tokens(block_masked, steps):
    """Tokens to commit at each of `steps` steps, per row [B, steps]: the block's masks spread evenly, the
    remainder going to the first steps (LLaDA's linear schedule: each step unmasks the same expected count)."""
    total = block_masked.sum(1, keepdim=True)
    base, rem = total // steps, total % steps
    return base + (torch.arange(steps, device=block_masked.device)[None, :] < rem).long()


def gumbel_argmax(logits, temperature, generator=None):
    """argmax of logits at temperature 0, else a draw from softmax(logits / temperature) by Gumbel-max in
    float64 (low-precision Gumbel noise is known to hurt masked-diffusion samples, arXiv:2409.02908).
    argmax(logits + T * Gumbel) is argmax(exp(logits) / (-log u)^T), LLaDA's form, without its overflow."""
    if temperature <= 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, dtype=torch.float64, generator=generator, device="cpu").to(logits.device)
    return (logits.double() - temperature * torch.log(-torch.log(u))).argmax(-1)


def _positions(key_mask, T, device):
    from model import positions_from_mask
    return positions_from_mask(key_mask, T, device).expand(key_mask.shape[0] if key_mask is not None else 1, T)


def forward_kv(model, ids, pos, attn_mask, past=None, suffix=None):
    """Our Qwen3's blocks run by hand so that queries of `ids` (at positions pos [B, n]) attend
    [past keys ; their own ; suffix keys] (each a per-layer list of (k, v) [B, Hkv, *, D], already rotated).
    attn_mask [B, n, keys] bool. -> (final normed hidden [B, n, C], per-layer (k, v) of `ids`).
    Eval-mode arithmetic of model.Qwen3.hidden (tested against it): same modules, same order."""
    x = model.embed(ids)
    cos, sin = model.rotary(pos, x.dtype)
    new = []
    for i, blk in enumerate(model.decoder.layers):
        a = blk.attn
        h = blk.attn_norm(x)
        B, n, _ = h.shape
        q = a.q_norm(a.q_proj(h).view(B, n, a.n_head, a.hd)).transpose(1, 2)
        k, v = a.project_kv(h)
        q, k = kernels.apply_rotary(q, cos, sin), kernels.apply_rotary(k, cos, sin)
        new.append((k, v))
        if past is not None:
            k, v = torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)
        if suffix is not None:
            k, v = torch.cat([k, suffix[i][0]], 2), torch.cat([v, suffix[i][1]], 2)
        mask = None if attn_mask is None else attn_mask[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        x = x + a.o_proj(y.transpose(1, 2).reshape(B, n, a.n_head * a.hd))
        x = x + blk.mlp(blk.mlp_norm(x))
    return model.decoder.norm(x), new


class _Caller:
    """Logits of the current block for the sampler: plain (the model's own forward over the whole sequence,
    or a toy callable) or through the per-block prefix key-value cache ('prefix' or 'dual')."""

    def __init__(self, model, key_mask, attn_mask, cache):
        self.model, self.key_mask, self.attn_mask, self.cache = model, key_mask, attn_mask, cache
        self.qwen3 = _plain_qwen3(model)
        self.nfe = 0
        if cache and self.qwen3 is None:
            raise ValueError("generate: cache needs the project's Qwen3 (its blocks are run by hand), not a callable")

    def __call__(self, x, lo, hi, first_step, sel):
        """Logits [N, V] of the block positions selected by sel [B, hi - lo] (the masked ones: the LM head,
        the softmax and the argmax run on nothing else)."""
        self.nfe += 1
        B, T = x.shape
        if not self.cache:
            if self.qwen3 is not None:
                h = self.qwen3.hidden(x, self.key_mask, attn="bidirectional", attn_mask=self.attn_mask)
                return F.linear(h[:, lo:hi][sel], self.qwen3.head_weight)
            am = self.attn_mask if self.attn_mask is not None else self.key_mask
            return self.model(x, am)[:, lo:hi][sel]
        m = self.qwen3
        mask = self.attn_mask
        if mask is None and self.key_mask is not None:
            mask = full_attention_mask(self.key_mask)
        pos = _positions(self.key_mask, T, x.device)
        # With block attention a block never sees what follows it: only [0, hi) is ever computed and the
        # prefix cache is exact. With full attention the later steps feed the block and everything after it
        # ('prefix') or only the block, reusing the suffix keys/values of the block's first step ('dual'):
        # Fast-dLLM's approximations (the cached keys do not see the block's new tokens).
        dual = self.cache == "dual" and self.attn_mask is None
        if first_step:
            end = hi if self.attn_mask is not None else T
            h, kv = forward_kv(m, x[:, :end], pos[:, :end], None if mask is None else mask[:, :end, :end])
            self.past = [(k[:, :, :lo], v[:, :, :lo]) for k, v in kv]
            self.suffix = [(k[:, :, hi:], v[:, :, hi:]) for k, v in kv] if dual else None
            return F.linear(h[:, lo:hi][sel], m.head_weight)
        stop = hi if (self.attn_mask is not None or dual) else T
        keys = T if dual else stop
        h, _ = forward_kv(m, x[:, lo:stop], pos[:, lo:stop], None if mask is None else mask[:, lo:stop, :keys],
                          past=self.past, suffix=self.suffix)
        return F.linear(h[:, :hi - lo][sel], m.head_weight)


@torch.no_grad()
def generate(model, prompt, attention_mask=None, steps=128, gen_length=128, block_length=128, temperature=0.,
             cfg_scale=0., remasking="low_confidence", mask_id=MASK_ID, logits_eos_inf=False,
             confidence_eos_eot_inf=False, eos_id=EOS_ID, eot_id=EOT_ID, threshold=None, cache=None,
             block_attention=False, see_earlier_blocks=True, remask_temperature=1.0, generator=None, stats=None):
    """LLaDA's reverse process: gen_length masks after the prompt, filled block by block (semi-autoregressive),
    steps // (gen_length // block_length) steps per block; each step predicts every masked token and commits
    the scheduled number of them (num_transfer_tokens), chosen by remasking:
      low_confidence  the highest probability of the predicted token
      random          uniformly random positions
      random_topk     MaskGIT's: log-probability + Gumbel noise scaled by remask_temperature x the block's
                      masked fraction (noisy early, greedy late)
    temperature > 0 samples each prediction by float64 Gumbel-max; cfg_scale > 0 runs an unconditional pass
    with the prompt masked and uses un + (cfg_scale + 1) (cond - un). logits_eos_inf forbids EOS;
    confidence_eos_eot_inf gives predicted EOS / <|im_end|> probability 0 (their logits set to -inf before the
    softmax, after the prediction) so they are committed last.

    Beyond the reference: threshold (a float) commits every masked token of the block whose confidence is
    >= threshold (at least the most confident one) and loops until the block is full, ignoring `steps` (the
    mask token itself is never predicted there);
    cache='prefix' | 'dual' reuses the keys/values before the block (and, 'dual', after it) from the block's
    first step; block_attention uses block_attention_mask (then the prefix cache is exact).

    prompt [B, P] long (left-padded with attention_mask [B, P] when rows differ in length); `model` is our
    Qwen3 (put it in eval mode) or a callable (ids, attention_mask) -> logits [B, T, V] (with block_attention
    the callable gets the [B, T, T] mask as attention_mask). Returns x [B, P + gen_length]; stats (a dict)
    receives nfe, the number of model calls."""
    if remasking not in ("low_confidence", "random", "random_topk"):
        raise ValueError(f"generate: remasking={remasking!r}; choose low_confidence, random or random_topk")
    if gen_length % block_length:
        raise ValueError(f"generate: gen_length={gen_length} must be a multiple of block_length={block_length}")
    num_blocks = gen_length // block_length
    if threshold is None and steps % num_blocks:
        raise ValueError(f"generate: steps={steps} must be a multiple of the number of blocks ({num_blocks})")
    if cache not in (None, False, "prefix", "dual"):
        raise ValueError(f"generate: cache={cache!r}; choose None, 'prefix' or 'dual'")
    if bool((prompt == mask_id).any()):
        raise ValueError(f"generate: the prompt holds the mask token {mask_id}")
    B, P = prompt.shape
    device = prompt.device
    T = P + gen_length
    x = torch.full((B, T), mask_id, dtype=torch.long, device=device)
    x[:, :P] = prompt
    key_mask = None
    if attention_mask is not None:
        key_mask = torch.cat([attention_mask.bool(), torch.ones(B, gen_length, dtype=torch.bool, device=device)], 1)
    prompt_index = x != mask_id
    attn_mask = block_attention_mask(P, T, block_length, see_earlier_blocks, key_mask, device) \
        if block_attention else None
    if attn_mask is not None and attn_mask.shape[0] != B:
        attn_mask = attn_mask.expand(B, T, T)
    if cfg_scale > 0:  # conditional and unconditional rows in one batch
        key_mask2 = None if key_mask is None else key_mask.repeat(2, 1)
        attn_mask2 = None if attn_mask is None else attn_mask.repeat(2, 1, 1)
        call = _Caller(model, key_mask2, attn_mask2, cache)
    else:
        call = _Caller(model, key_mask, attn_mask, cache)
    steps_per_block = steps // num_blocks if threshold is None else None

    for nb in range(num_blocks):
        lo, hi = P + nb * block_length, P + (nb + 1) * block_length
        counts = num_transfer_tokens(x[:, lo:hi] == mask_id, steps_per_block) if threshold is None else None
        i, first = 0, True
        while True:
            masked = x[:, lo:hi] == mask_id
            if threshold is None:
                if i == steps_per_block:
                    break
                if not bool(counts[:, i].any()):  # nothing scheduled: the reference's step changes nothing
                    i += 1
                    continue
            elif not bool(masked.any()):
                break
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                both = call(torch.cat([x, un_x]), lo, hi, first, masked.repeat(2, 1))
                cond, un = both[:len(both) // 2], both[len(both) // 2:]
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                logits = call(x, lo, hi, first, masked)   # [N, V]: the masked positions of the block, row-major
            first = False
            if logits_eos_inf:
                logits[:, eos_id] = -torch.inf
            if threshold is not None and mask_id < logits.shape[-1]:
                # a committed mask token would leave its position masked and the block would never fill
                # (the reference's scheduled steps just leave such a hole; they are kept as they are)
                logits[:, mask_id] = -torch.inf
            pred = gumbel_argmax(logits, temperature, generator)
            if remasking == "random":
                c = torch.rand(masked.shape, generator=generator).to(device)[masked]
            else:
                if confidence_eos_eot_inf:
                    logits[:, eos_id] = logits[:, eot_id] = -torch.inf
                c = torch.gather(F.softmax(logits.float(), dim=-1), -1, pred[:, None]).squeeze(-1)
                if remasking == "random_topk":
                    u = torch.rand(masked.shape, dtype=torch.float64, generator=generator).to(device)[masked]
                    frac = masked.double().mean(1, keepdim=True).expand(masked.shape)[masked]
                    c = c.double().log() - remask_temperature * frac * torch.log(-torch.log(u))
            x0 = x[:, lo:hi].clone()
            x0[masked] = pred
            conf = torch.full(masked.shape, -torch.inf, dtype=c.dtype, device=device)
            conf[masked] = c
            commit = torch.zeros_like(masked)
            for j in range(B):
                if threshold is None:
                    k = int(counts[j, i])
                    if k:
                        commit[j, torch.topk(conf[j], k).indices] = True
                elif bool(masked[j].any()):
                    commit[j] = masked[j] & (conf[j] >= threshold)
                    commit[j, conf[j].argmax()] = True
            x[:, lo:hi] = torch.where(commit, x0, x[:, lo:hi])
            i += 1
    if stats is not None:
        stats["nfe"] = call.nfe
    return x


# ---------------------------------------------------------------------------------------
# the train.py objective (objective='diffusion')

CONFIG = {
    "diffusion_data": "pretrain",       # 'pretrain': windows of the token shards in data_dir; 'sft': conversation JSONL
    "diffusion_sft_train": "",          # SFT: train JSONL ({"conversations": [...], "system": ...} per line)
    "diffusion_sft_val": "",            # SFT: validation JSONL ('' = no validation)
                                        # (SFT with trim_vocab keeps the ids of data_dir's shards and the SFT files)
    "diffusion_seq_len": 0,             # tokens per row; 0 = dec_len
    "diffusion_loss": "llada",          # 'llada' (CE / p_mask, / b*l), 'dllm' (mean CE per sequence), 'soft_ce'
    "diffusion_label_smoothing": 0.1,   # soft_ce only
    "diffusion_schedule": "uniform",    # masked fraction as a function of t: uniform, cosine, power, sigmoid
    "diffusion_schedule_power": 2.0,    # power: rate = t ** power
    "diffusion_sigmoid_k": 10.0,        # sigmoid: steepness
    "diffusion_noise_type": "mask",     # 'mask' or 'random_replace' (a token from the batch instead of the mask)
    "diffusion_eps": EPS,               # p_mask = (1 - eps) * rate(t) + eps
    "diffusion_t_low": 0.0,             # t ~ U(t_low, t_high) (dLLM's [lower, upper])
    "diffusion_t_high": 1.0,
    "diffusion_min_masking_rate": 0.0,  # floor on p_mask
    "diffusion_mask_contiguous_region_prob": 0.0,  # probability that a row's noise is one contiguous span
    "diffusion_reweight_cap": 0.0,      # upper bound on 1 / p_mask (0 = none)
    "diffusion_shorten_prob": 0.01,     # pretraining rows cut to a random length in [1, L] (LLaDA's 1 %)
    "diffusion_block_attention": 0,     # > 0: block attention with blocks of this many tokens (0 = bidirectional)
    "diffusion_see_earlier_blocks": True,
}


class Objective:
    """Masked diffusion on a decoder-only Qwen3 made bidirectional. Batches carry the noisy ids, the clean
    tokens at noised positions (labels), per-token loss weights and the units each row counts for, so
    train.py's token-weighted sum / count gives each loss's own normalisation whatever the batch split.
    Validation groups: 'elbo' (the training estimate, without label smoothing) and 'cond_nll' (the Monte-Carlo
    conditional NLL per answer token: second half of a window given the first, or the SFT answer given its
    prompt)."""
    model_type = "decoder"
    id_keys = ("ids", "labels")
    extra_ids = (MASK_ID, EOS_ID, EOT_ID, IM_START_ID)
    groups = ["elbo", "cond_nll"]

    def __init__(self, c, model_cfg, rank, world):
        self.c, self.seed = c, c.seed
        choices = {"diffusion_data": ("pretrain", "sft"), "diffusion_loss": LOSSES, "diffusion_schedule": SCHEDULES,
                   "diffusion_noise_type": ("mask", "random_replace")}
        for key, ok in choices.items():
            if getattr(c, key) not in ok:
                raise ValueError(f"config key '{key}' is {getattr(c, key)!r}; choose one of {', '.join(ok)}")
        if not 0 <= c.diffusion_eps < 1 or not 0 <= c.diffusion_t_low < c.diffusion_t_high <= 1:
            raise ValueError("config keys diffusion_eps must lie in [0, 1) and 0 <= diffusion_t_low < diffusion_t_high <= 1")
        if c.diffusion_loss == "dllm" and c.diffusion_noise_type != "mask":
            raise ValueError("config key diffusion_loss='dllm' finds noised tokens as ids == the mask token; "
                             "use diffusion_noise_type='mask'")
        if MASK_ID >= model_cfg.vocab_size:
            raise ValueError(f"the mask token {MASK_ID} needs a model vocabulary of at least {MASK_ID + 1} rows "
                             f"(model has {model_cfg.vocab_size})")
        self.L = c.diffusion_seq_len or c.dec_len
        self.block = c.diffusion_block_attention
        self.noise = dict(eps=c.diffusion_eps, schedule=c.diffusion_schedule, power=c.diffusion_schedule_power,
                          sigmoid_k=c.diffusion_sigmoid_k, t_low=c.diffusion_t_low, t_high=c.diffusion_t_high,
                          min_rate=c.diffusion_min_masking_rate, contiguous_prob=c.diffusion_mask_contiguous_region_prob,
                          noise_type=c.diffusion_noise_type, mask_id=MASK_ID)
        self.val, self.shard_sets = None, []
        if c.diffusion_data == "pretrain":
            from data import WindowSampler, open_shards
            train = open_shards(c, model_cfg, "train", with_sentinels=False)
            val = open_shards(c, model_cfg, "val", with_sentinels=False) if c.eval_interval or c.trim_vocab else None
            self.shard_sets = [s for s in (train, val) if s is not None]  # what trim_vocab scans
            self.train = WindowSampler(train, self.L, c.seed, f"{c.data_dir} train split")
            if c.eval_interval:
                self.val = WindowSampler(val, self.L, 0, f"{c.data_dir} val split")
        else:
            from tokenizer import load_tokenizer
            tok = load_tokenizer()
            self.sft = self._load_sft(tok, c.diffusion_sft_train, "diffusion_sft_train")
            if c.diffusion_sft_val and c.eval_interval:
                self.val = self._load_sft(tok, c.diffusion_sft_val, "diffusion_sft_val")
            used = set(np.unique(self.sft[0]).tolist())
            if self.val is not None:
                used |= set(np.unique(self.val[0]).tolist())
            self.extra_ids = tuple(sorted(used | set(Objective.extra_ids)))  # what trim_vocab must keep
            if c.trim_vocab:  # train.py trims to the ids of shard_sets + extra_ids: the pretraining shards' ids
                from data import open_shards
                self.shard_sets = [open_shards(c, model_cfg, "train", with_sentinels=False)]
            self._epoch, self._perm = -1, None

    def _load_sft(self, tok, path, key):
        if not path or not os.path.isfile(path):
            raise ValueError(f"config key '{key}': {path!r} is not a file; build one with data/squad_sft/prepare.py")
        ids, plen, dropped = sft_examples(read_conversations(path), tok, self.L)
        if len(ids) == 0:
            raise ValueError(f"{path}: no conversation fits diffusion_seq_len={self.L} tokens ({dropped} dropped)")
        if dropped:
            print(f"note: {path}: {dropped} of {dropped + len(ids)} pairs longer than {self.L} tokens dropped")
        return ids, plen

    def _rng(self, salt, k):
        return np.random.default_rng([self.seed, salt, k])

    def _pretrain(self, windows, first, salt, shorten_prob):
        """Rows noised one by one from their own generator (seed, row index): row k is the same whatever
        batch it lands in."""
        B, T = windows.shape
        ids, noised, p, attn = np.empty_like(windows), np.zeros((B, T), bool), np.empty(B), np.ones((B, T), bool)
        lengths = np.empty(B, np.int64)
        for b in range(B):
            rng = self._rng(salt, first + b)
            lengths[b] = shorten_rows(attn[b:b + 1], rng, shorten_prob)[0]
            i, n, pb = noise_rows(windows[b:b + 1], rng, attn[b:b + 1], **self.noise)
            ids[b], noised[b], p[b] = i[0], n[0], pb[0]
        w, units = loss_weights(noised, p, self.c.diffusion_loss, self.c.diffusion_reweight_cap, per_row=lengths)
        return {"ids": ids, "labels": np.where(noised, windows, IGNORE_INDEX).astype(np.int64), "weight": w,
                "count": units, "mask": attn, "prompt_len": np.zeros(B, np.int64)}

    def _sft_index(self, first, rows):
        n = len(self.sft[0])
        out = np.empty(rows, np.int64)
        for i, k in enumerate(range(first, first + rows)):
            epoch, j = divmod(k, n)
            if epoch != self._epoch:
                self._epoch, self._perm = epoch, np.random.default_rng([self.seed, 99, epoch]).permutation(n)
            out[i] = self._perm[j]
        return out

    def _sft(self, ids, plen, first, salt):
        return sft_rows(ids.astype(np.int64), plen, lambda k: self._rng(salt, k), first,
                        loss_kind=self.c.diffusion_loss, reweight_cap=self.c.diffusion_reweight_cap, **self.noise)

    def train_batch(self, step, first, rows):
        if self.c.diffusion_data == "pretrain":
            return self._pretrain(self.train.windows(first, rows), first, 1, self.c.diffusion_shorten_prob)
        idx = self._sft_index(first, rows)
        return self._sft(self.sft[0][idx], self.sft[1][idx], first, 1)

    def eval_batch(self, index, rows):
        """Fixed validation rows: the first half 'elbo', the rest 'cond_nll' (Monte-Carlo, one draw per row)."""
        if self.val is None:
            return None
        first = index * rows
        if self.c.diffusion_data == "pretrain":
            clean = self.val.windows(first, rows)
            plen = np.full(rows, self.L // 2, np.int64)
        else:
            k = np.arange(first, first + rows) % len(self.val[0])
            clean, plen = self.val[0][k].astype(np.int64), self.val[1][k]
        n_elbo = (rows + 1) // 2
        if self.c.diffusion_data == "pretrain":
            elbo = self._pretrain(clean[:n_elbo], first, 2, 0.0)
        else:
            elbo = self._sft(clean[:n_elbo], plen[:n_elbo], first, 2)
        noisy, labels, w, units = mc_rows(clean[n_elbo:], plen[n_elbo:], self._rng(3, index))
        cond = {"ids": noisy, "labels": labels, "weight": w, "count": units,
                "mask": np.ones(noisy.shape, bool), "prompt_len": plen[n_elbo:]}
        out = {k: np.concatenate([elbo[k], cond[k]]) for k in elbo}
        out["group"] = np.array([0] * n_elbo + [1] * (rows - n_elbo), np.int64)
        return out

    def real_tokens(self, b):
        """(encoder, decoder, real) positions of a batch for train.py's tokens/s: real = not padding."""
        return 0, b["ids"].size, int(b["mask"].sum())

    def loss(self, model, batch):
        # train.py's evaluation pads a group with no rows by a dummy whose labels are all ignored: it counts
        # nothing (a real row with no noised token keeps its count: its weights are all zero)
        scored = (batch["labels"] != IGNORE_INDEX).any(1) | (batch["weight"] == 0).all(1)
        batch = {**batch, "count": batch["count"] * scored}
        attn_mask = None
        if self.block:
            attn_mask = block_attention_mask(batch["prompt_len"], batch["ids"].shape[1], self.block,
                                             self.c.diffusion_see_earlier_blocks, batch.get("mask"))
        smoothing = self.c.diffusion_label_smoothing if self.c.diffusion_loss == "soft_ce" and "group" not in batch else 0.0
        return diffusion_loss(model, batch, smoothing, attn_mask)
