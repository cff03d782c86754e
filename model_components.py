"""The pieces of a Qwen3 block: RMSNorm, rotary embedding, GQA attention with QK-norm, SwiGLU MLP.

Attention comes in three modes, all through scaled_dot_product_attention:
  causal         decoder-only Qwen3 (merged attention with an empty encoder)
  bidirectional  the encoder: every query sees every real key (padding mask only)
  merged         the decoder: queries over [encoder ; decoder] keys, see `merged_attention`
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import kernels


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps)


class Rotary(nn.Module):
    """Rotary position embedding, cos/sin tables cached in fp32 and grown on demand."""

    def __init__(self, head_dim, theta):
        super().__init__()
        # same arithmetic as Qwen3 (fp32 inverse frequencies), so logits match to the last bits
        # a plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float()
                                         / head_dim))
        self._cos = self._sin = None

    def _table(self, length, device):
        if self._cos is None or self._cos.shape[0] < length or self._cos.device != device:
            n = max(length, 2 * (0 if self._cos is None else self._cos.shape[0]), 256)
            freqs = torch.arange(n, device=device, dtype=torch.float32)[:, None] * self.inv_freq.to(device)[None]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos, self._sin = emb.cos(), emb.sin()
        return self._cos, self._sin

    def forward(self, positions, dtype):
        """positions: [T] or [B, T] integer tensor -> cos, sin of shape [T, D] or [B, T, D] in `dtype`."""
        cos, sin = self._table(int(positions.max()) + 1 if positions.numel() else 1, positions.device)
        return cos[positions].to(dtype), sin[positions].to(dtype)


def bidirectional_attention(q, k, v, key_mask=None):
    """Encoder attention: every query sees every real key. key_mask [B, S] bool, True = real token."""
    mask = None
    if key_mask is not None and not bool(key_mask.all()):
        # a row with no real token at all would softmax over nothing: let it see everything instead
        key_mask = key_mask | ~key_mask.any(-1, keepdim=True)
        mask = key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def merged_attention(q, k, v, enc_k=None, enc_v=None, enc_mask=None, dec_mask=None):
    """Decoder attention over [encoder ; decoder] keys, softmaxed jointly.

    q      [B, H, t, D]    the newest t decoder queries (t = T without a cache)
    k, v   [B, Hkv, T, D]  all decoder keys/values so far (the last t belong to the queries)
    enc_k, enc_v [B, Hkv, S, D]  encoder states projected by the same k/v projections and k-norm
    enc_mask [B, S], dec_mask [B, T]: True = real token (None = no padding)

    Putting the encoder keys first makes the mask bottom-right-aligned causal over S + T keys: the
    query at decoder position i sees all S encoder keys and decoder keys 0..i. Without padding that mask
    needs no tensor at all (SDPA's lower-right causal bias, which flash kernels take natively).
    With an empty encoder (S = 0) this is exactly causal self-attention.
    """
    t, T = q.shape[2], k.shape[2]
    if enc_k is not None and enc_k.shape[2] > 0:
        k, v = torch.cat([enc_k, k], dim=2), torch.cat([enc_v, v], dim=2)
    else:
        enc_mask = None
    S = k.shape[2] - T
    pad = (enc_mask is not None and not bool(enc_mask.all())) or (dec_mask is not None and not bool(dec_mask.all()))
    if not pad:
        if t == 1:  # one new query sees every key
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        if S == 0 and t == T:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(t, S + T), enable_gqa=True)
    B, device = q.shape[0], q.device
    causal = torch.ones(t, T, dtype=torch.bool, device=device).tril(T - t)  # query i at position T-t+i
    dec_keys = causal[None] if dec_mask is None else causal[None] & dec_mask[:, None, :]
    # a padded query that would see no key at all (left padding) sees itself, to keep softmax finite
    itself = torch.arange(T, device=device)[None, :] == torch.arange(T - t, T, device=device)[:, None]
    dec_keys = dec_keys | itself[None]
    enc_keys = (torch.ones(B, S, dtype=torch.bool, device=device) if enc_mask is None else enc_mask)
    mask = torch.cat([enc_keys[:, None, :].expand(B, t, S), dec_keys.expand(B, t, T)], dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)


class Attention(nn.Module):
    """Grouped-query attention with per-head RMSNorm on queries and keys (QK-norm), no biases."""

    def __init__(self, cfg):
        super().__init__()
        c, hd = cfg.hidden_size, cfg.head_dim
        self.n_head, self.n_kv, self.hd = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = nn.Linear(c, self.n_head * hd, bias=False)
        self.k_proj = nn.Linear(c, self.n_kv * hd, bias=False)
        self.v_proj = nn.Linear(c, self.n_kv * hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * hd, c, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def project_kv(self, x):
        """Keys (k-normed, no rotary yet) and values [B, Hkv, T, D]; also used on encoder states."""
        B, T, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.hd)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        return k, v

    def forward(self, x, cos, sin, mode, key_mask=None, enc_out=None, enc_mask=None, cache=None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.hd)).transpose(1, 2)
        k, v = self.project_kv(x)
        q, k = kernels.apply_rotary(q, cos, sin), kernels.apply_rotary(k, cos, sin)
        if mode == "bidirectional":
            y = bidirectional_attention(q, k, v, key_mask)
        else:
            # encoder keys carry no rotary: a decoder position and an encoder position are in different
            # sequences, so their distance means nothing; unrotated keys also make the encoder keys/values
            # independent of the decoder position, so a cache projects them once per prompt.
            enc_kv = cache.enc_kv if cache is not None else None
            if enc_kv is None and enc_out is not None:
                enc_kv = self.project_kv(enc_out)
                if cache is not None:
                    cache.enc_kv = enc_kv
            if cache is not None:
                k, v = cache.append(k, v)
            enc_k, enc_v = enc_kv if enc_kv is not None else (None, None)
            y = merged_attention(q, k, v, enc_k, enc_v, enc_mask, key_mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm Qwen3 block; the same weights serve as an encoder block (bidirectional) or decoder block."""

    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mode, key_mask=None, enc_out=None, enc_mask=None, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mode, key_mask, enc_out, enc_mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class LayerCache:
    """One decoder layer's keys/values: the encoder's (projected once) and the decoder's own (appended)."""

    def __init__(self):
        self.enc_kv = None
        self.k = self.v = None

    def append(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class KVCache:
    """Key-value cache for incremental decoding: one LayerCache per decoder layer plus the position."""

    def __init__(self, num_layers):
        self.layers = [LayerCache() for _ in range(num_layers)]
        self.pos = 0
