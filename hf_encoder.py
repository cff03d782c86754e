"""The bidirectional Qwen3-style encoder for transformers (trust_remote_code). Self-contained on purpose:
extract.py copies this file into every exported directory, which must load without this project.

    model = AutoModel.from_pretrained(dir, trust_remote_code=True)
    out = model(**tokenizer(texts, padding=True, return_tensors="pt"))
    out.last_hidden_state   # token states [B, T, C]
    out.pooler_output       # sentence embeddings [B, C]: pooled as config.pooling says, L2-normalised if
                            # config.normalize
    AutoModel.from_pretrained(dir, trust_remote_code=True, truncate_dim=128)   # Matryoshka: the first 128
                            # values of each embedding, normalised after the cut

Each block is a Qwen3 decoder block with the causal mask removed: pre-RMSNorm, grouped-query attention
with per-head RMSNorm on queries and keys and rotary positions that count real tokens only (so padding on
either side leaves a text's states unchanged), SwiGLU MLP. cls pooling reads the first real token, last
pooling the last real token.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling


class Qwen3EncoderConfig(PretrainedConfig):
    model_type = "qwen3_encoder"

    def __init__(self, vocab_size=152036, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0,
                 rms_norm_eps=1e-6, max_position_embeddings=40960, pooling="mean", normalize=True,
                 max_seq_length=512, pad_token_id=151643, truncate_dim=None, matryoshka_dims=(), prompts=None,
                 **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.head_dim = num_key_value_heads, head_dim
        self.rope_theta, self.rms_norm_eps = rope_theta, rms_norm_eps
        self.max_position_embeddings, self.max_seq_length = max_position_embeddings, max_seq_length
        self.pooling, self.normalize = pooling, normalize
        self.truncate_dim, self.matryoshka_dims, self.prompts = truncate_dim, list(matryoshka_dims), prompts
        super().__init__(pad_token_id=pad_token_id, **kwargs)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # as Qwen3: normalise in fp32, cast back, then scale
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary(T, head_dim, theta, device):
    """cos, sin [T, head_dim] in fp32 for positions 0..T-1 (computed per call: no buffer to initialise,
    which keeps loading on transformers' meta device simple)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x, cos, sin):
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
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
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


def pool(states, mask, how):
    """[B, T, C] token states, [B, T] mask (1 = real token, either padding side) -> [B, C] in fp32."""
    states, mask = states.float(), mask.int()
    if how == "mean":
        m = mask.float()[..., None]
        return (states * m).sum(1) / m.sum(1).clamp(min=1.0)
    rows = torch.arange(states.shape[0], device=states.device)
    if how == "cls":  # the first real token
        return states[rows, mask.argmax(1)]
    if how == "last":  # the last real token
        return states[rows, mask.shape[1] - 1 - mask.flip(1).argmax(1)]
    raise ValueError(f"config.pooling must be mean, cls or last, got {how!r}")


class Stack(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3EncoderModel(PreTrainedModel):
    config_class = Qwen3EncoderConfig
    base_model_prefix = "qwen3_encoder"
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.encoder = Stack(config)  # names as in the training checkpoint: embed.*, encoder.*
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
        # every query sees every real key; a row without any real token sees everything (finite softmax)
        keys = real | ~real.any(-1, keepdim=True)
        mask = keys[:, None, None, :]
        x = self.embed(input_ids)
        # positions count real tokens only, so left and right padding give the same states
        pos = (real.long().cumsum(-1) - 1).clamp(min=0)
        cos, sin = rotary(T, self.config.head_dim, self.config.rope_theta, input_ids.device)
        cos, sin = cos[pos][:, None].to(x.dtype), sin[pos][:, None].to(x.dtype)  # [B, 1, T, D]
        for block in self.encoder.layers:
            x = block(x, cos, sin, mask)
        x = self.encoder.norm(x)
        e = pool(x, real, self.config.pooling)
        if self.config.truncate_dim:
            e = e[:, :self.config.truncate_dim]
        if self.config.normalize:
            e = F.normalize(e, dim=-1)
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=e)
