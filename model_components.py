"""The pieces of a Qwen3 block: RMSNorm, rotary embedding, GQA attention with QK-norm, SwiGLU MLP.

Attention comes in three modes, all through one call (`attend`):
  causal         decoder-only Qwen3 (merged attention with an empty encoder)
  bidirectional  the encoder: every query sees every key of its own segment (padding mask only)
  merged         the decoder: queries over [encoder ; decoder] keys, see `merged_attention`
The mask (padding, packed segments) is built once per forward by `build_mask` and shared by
every layer: no layer inspects its inputs, so blocks compile without graph breaks or host syncs.
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


def _flex(cuda):
    """flex_attention, compiled once on CUDA (compiled it is a fused kernel; eager, on CPU, a reference)."""
    global _FLEX
    from torch.nn.attention.flex_attention import flex_attention
    if not cuda:
        return flex_attention
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


_FLEX = None
ATTENTION_BACKEND = "auto"  # 'auto': flex_attention for masked attention on CUDA, SDPA otherwise; 'sdpa'; 'flex'


def set_attention_backend(name):
    global ATTENTION_BACKEND
    if name not in ("auto", "sdpa", "flex"):
        raise ValueError(f"attention backend {name!r}: choose auto, sdpa or flex")
    ATTENTION_BACKEND = name


def build_mask(q_seg, kv_seg, causal, enc_seg=None, flex=None):
    """Which keys each query sees, decided once per forward and shared by every layer.

    q_seg [B, t], kv_seg [B, T]: segment ids, 0 = padding. A query sees the keys of its own segment, so
    packed examples never see each other and a padding query sees padding (never an empty row: softmax
    stays finite, and nothing reads padding outputs). causal: the t queries are the last t of the T keys
    and see only keys at or before their own position. enc_seg [B, S]: encoder keys placed before the T
    keys (merged attention); a decoder query sees the encoder keys of its own segment.

    Returns a bool tensor [B, 1, t, S + T] for SDPA, or a flex_attention BlockMask (flex=True, the
    default on CUDA under the 'auto' backend): SDPA with a mask and GQA falls back to the math kernel
    there, which materialises fp32 scores; flex compiles the same rule into a fused block-sparse kernel.
    """
    B, t = q_seg.shape
    T, S = kv_seg.shape[1], 0 if enc_seg is None else enc_seg.shape[1]
    if flex is None:
        flex = ATTENTION_BACKEND == "flex" or (ATTENTION_BACKEND == "auto" and q_seg.is_cuda)
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask
        off = T - t

        def mask_mod(b, h, q, kv):
            qs = q_seg[b, q]
            dec = kv_seg[b, (kv - S).clamp(min=0)] == qs
            if causal:
                dec = dec & (kv - S <= q + off)
            if S == 0:
                return dec
            return torch.where(kv < S, enc_seg[b, kv.clamp(max=S - 1)] == qs, dec)

        return create_block_mask(mask_mod, B, None, t, S + T, device=q_seg.device, _compile=q_seg.is_cuda)
    mask = q_seg[:, :, None] == kv_seg[:, None, :]
    if causal:
        mask = mask & torch.ones(t, T, dtype=torch.bool, device=q_seg.device).tril(T - t)
    if S:
        mask = torch.cat([q_seg[:, :, None] == enc_seg[:, None, :], mask], dim=2)
    return mask[:, None]


def dense_to_block_mask(allowed):
    """A caller's own [B, T, T] bool mask (True = may attend) as a BlockMask for flex_attention."""
    from torch.nn.attention.flex_attention import create_block_mask
    B, T, S = allowed.shape
    return create_block_mask(lambda b, h, q, kv: allowed[b, q, kv], B, None, T, S, device=allowed.device,
                             _compile=allowed.is_cuda)


def attend(q, k, v, mask, causal, dropout=0.0):
    """One attention call for every mode. mask: None (no padding: plain or lower-right causal SDPA, which
    flash kernels take without a tensor), a bool tensor from build_mask, or a flex BlockMask."""
    if mask is not None and not isinstance(mask, torch.Tensor):  # a BlockMask (no dropout: see Attention)
        return _flex(q.is_cuda)(q, k, v, block_mask=mask, enable_gqa=True)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=True)
    t, T = q.shape[2], k.shape[2]
    if not causal or t == 1:  # bidirectional, or one new query that sees every key
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, enable_gqa=True)
    if t == T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(t, T), dropout_p=dropout,
                                          enable_gqa=True)


def merged_attention(q, k, v, enc_k=None, enc_v=None, mask=None, dropout=0.0):
    """Decoder attention over [encoder ; decoder] keys, softmaxed jointly.

    q      [B, H, t, D]    the newest t decoder queries (t = T without a cache)
    k, v   [B, Hkv, T, D]  all decoder keys/values so far (the last t belong to the queries)
    enc_k, enc_v [B, Hkv, S, D]  encoder states projected by the same k/v projections and k-norm
    mask   None (no padding, one example per row) or build_mask(dec_seg[-t:], dec_seg, True, enc_seg)

    Putting the encoder keys first makes the mask bottom-right-aligned causal over S + T keys: the
    query at decoder position i sees all S encoder keys and decoder keys 0..i. Without padding that mask
    needs no tensor at all (SDPA's lower-right causal bias, which flash kernels take natively).
    With an empty encoder (S = 0) this is exactly causal self-attention.
    """
    if enc_k is not None and enc_k.shape[2] > 0:
        k, v = torch.cat([enc_k, k], dim=2), torch.cat([enc_v, v], dim=2)
    return attend(q, k, v, mask, causal=True, dropout=dropout)


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
        self.dropout = 0.0  # on attention probabilities in training (set_dropout); Qwen3 itself has none

    def project_kv(self, x):
        """Keys (k-normed, no rotary yet) and values [B, Hkv, T, D]; also used on encoder states."""
        B, T, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.hd)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        return k, v

    def encoder_kv(self, enc_out, enc_rope):
        """The encoder's keys/values as this decoder layer sees them. enc_rope None: unrotated keys, as in
        transformers' T5Gemma2 -- an unrotated key scores like a key at position 0, so a decoder query at
        position m sees every encoder key at distance m. enc_rope (cos, sin) at the encoder's own positions:
        the prefix-LM view the pretrained decoder knows, with decoder positions continuing after the encoder
        (ModelConfig.enc_rope = 'prefix'). Either way they depend only on the encoder, so a cache keeps them."""
        k, v = self.project_kv(enc_out)
        if enc_rope is not None:
            k = kernels.apply_rotary(k, *enc_rope)
        return k, v

    def forward(self, x, cos, sin, mode, mask=None, enc_out=None, enc_rope=None, cache=None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.hd)).transpose(1, 2)
        k, v = self.project_kv(x)
        q, k = kernels.apply_rotary(q, cos, sin), kernels.apply_rotary(k, cos, sin)
        dropout = self.dropout if self.training else 0.0
        if dropout and mask is not None and not isinstance(mask, torch.Tensor):
            raise ValueError("attention dropout needs the SDPA backend (flex_attention has no dropout); "
                             "call model_components.set_attention_backend('sdpa')")
        if mode == "bidirectional":
            y = attend(q, k, v, mask, causal=False, dropout=dropout)
        elif mode == "causal":
            y = attend(q, k, v, mask, causal=True, dropout=dropout)
        else:
            enc_kv = cache.enc_kv if cache is not None else None
            if enc_kv is None and enc_out is not None:
                enc_kv = self.encoder_kv(enc_out, enc_rope)
                if cache is not None:
                    cache.enc_kv = enc_kv
            if cache is not None:
                k, v = cache.append(k, v)
            enc_k, enc_v = enc_kv if enc_kv is not None else (None, None)
            y = merged_attention(q, k, v, enc_k, enc_v, mask, dropout)
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

        self.dropout = 0.0  # on the attention and MLP outputs before each residual add (set_dropout)

    def forward(self, x, cos, sin, mode, mask=None, enc_out=None, enc_rope=None, cache=None):
        p = self.dropout if self.training else 0.0
        x = x + F.dropout(self.attn(self.attn_norm(x), cos, sin, mode, mask, enc_out, enc_rope, cache), p)
        return x + F.dropout(self.mlp(self.mlp_norm(x)), p)


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
