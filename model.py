"""Qwen3 (decoder-only causal LM) and the encoder-decoder built from it (T5Gemma recipe).

Qwen3            embed -> causal blocks -> norm -> LM head (tied or not); loads/saves Hugging Face files.
EncoderDecoder   embed -> bidirectional blocks -> norm = encoder states
                 embed -> merged-attention blocks (queries over [encoder ; decoder]) -> norm -> tied head.
Both stacks start as copies of the Qwen3 layers; one embedding matrix serves encoder input, decoder
input and LM head.
"""
import json
import os
import sys
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils.checkpoint import checkpoint as activation_checkpoint

import checkpoint
import kernels
import model_components as components
from model_components import Block, KVCache, RMSNorm, Rotary, build_mask
from model_config import ModelConfig
from tokenizer import EOS_ID, IGNORE_INDEX, MODE_IDS, QWEN3_VOCAB_SIZE


def positions_from_mask(mask, T, device):
    """Token positions that skip padding, so a left-padded sequence sees the same positions as unpadded."""
    if mask is None:
        return torch.arange(T, device=device)
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def segment_positions(seg):
    """Positions restarting at 0 at the start of every segment of a packed row: seg [B, T] -> [B, T]."""
    idx = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)
    start = torch.ones_like(seg, dtype=torch.bool)
    start[:, 1:] = seg[:, 1:] != seg[:, :-1]
    return idx - torch.where(start, idx, 0).cummax(1).values


def padding_segments(mask):
    """A padding mask as segment ids (1 = real, 0 = padding), or None when there is no padding at all:
    one host sync per forward (skipped under compile), so unpadded batches keep the mask-free kernels."""
    if mask is None:
        return None
    if not torch.compiler.is_compiling() and bool(mask.all()):
        return None
    return mask.long()


def custom_mask(allowed):
    """A caller's [B, T, T] bool mask in the form the attention backend takes."""
    if allowed.is_cuda and components.ATTENTION_BACKEND != "sdpa" or components.ATTENTION_BACKEND == "flex":
        return components.dense_to_block_mask(allowed)
    return allowed[:, None]


class Stack(nn.Module):
    """A run of blocks and the final norm: Qwen3's decoder, our encoder, or our decoder."""

    def __init__(self, cfg, num_layers):
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg) for _ in range(num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.activation_checkpointing = False

    def forward(self, x, cos, sin, mode, mask=None, enc_out=None, enc_rope=None, cache=None):
        for i, block in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            if self.activation_checkpointing and self.training:
                x = activation_checkpoint(block, x, cos, sin, mode, mask, enc_out, enc_rope, layer_cache,
                                          use_reentrant=False)
            else:
                x = block(x, cos, sin, mode, mask, enc_out, enc_rope, layer_cache)
        return self.norm(x)


def set_dropout(model, attn=0.0, hidden=0.0):
    """Dropout for fine-tuning stages (SimCSE needs it; Qwen3 has none): on attention probabilities and on
    each block's attention and MLP outputs. A run-time setting, active in train() mode, never saved."""
    for block in model.modules():
        if isinstance(block, Block):
            block.dropout, block.attn.dropout = float(hidden), float(attn)


def _init_weights(module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


# ---------------------------------------------------------------------------------------
# safetensors I/O

def read_safetensors_dir(path):
    """All tensors of a Hugging Face checkpoint dir: model.safetensors or a sharded index."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(single):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json; "
                                "pass a checkpoint directory written by save_pretrained")
    tensors = {}
    for name in files:
        file = os.path.join(path, name)
        checkpoint.check_safetensors(file)  # a truncated or damaged file: one line naming it, not a traceback
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


# every file is written through checkpoint.py's one atomic write (temporary name, fsync, rename)
write_json, write_safetensors = checkpoint.write_json, checkpoint.write_safetensors


def _read_config(path):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json; pass a directory written by save_pretrained "
                                "(or a Hugging Face Qwen3 checkpoint)")
    with open(cfg_path) as f:
        return json.load(f)


# our parameter names <-> Hugging Face Qwen3 names
_HF_RENAMES = [("embed.", "model.embed_tokens."), ("decoder.layers.", "model.layers."),
               ("decoder.norm.", "model.norm."), (".attn.", ".self_attn."),
               (".attn_norm.", ".input_layernorm."), (".mlp_norm.", ".post_attention_layernorm.")]


def to_hf_name(name):
    for ours, hf in _HF_RENAMES:
        name = name.replace(ours, hf)
    return name


def from_hf_name(name):
    for ours, hf in _HF_RENAMES:
        name = name.replace(hf, ours)
    return name


def _load_qwen3_tensors(hf_dir, cfg, dtype):
    """Hugging Face Qwen3 tensors under our names (embed.*, decoder.*, lm_head.*), cast to dtype."""
    sd = {from_hf_name(k): v.to(dtype) for k, v in read_safetensors_dir(hf_dir).items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


# ---------------------------------------------------------------------------------------
# decoder-only Qwen3

class Qwen3(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.decoder = Stack(cfg, cfg.num_layers)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        self.apply(_init_weights)

    def set_activation_checkpointing(self, flag=True):
        self.decoder.activation_checkpointing = flag

    def set_dropout(self, attn=0.0, hidden=0.0):
        set_dropout(self, attn, hidden)

    @property
    def head_weight(self):
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def hidden(self, idx, attention_mask=None, position_ids=None, attn="causal", attn_mask=None, seg=None):
        """Final normed hidden states [B, T, C].

        attention_mask [B, T]: 1 = real token, 0 = padding (positions skip padding).
        attn: 'causal' (Qwen3) or 'bidirectional' (every query sees every real key: the encoder recipe).
        attn_mask [B, T, T] bool (True = may attend) replaces the structure `attn` picks (padding included).
        seg [B, T]: packed documents (segment ids, 0 = padding); positions restart in each segment."""
        if attn not in ("causal", "bidirectional"):
            raise ValueError(f"Qwen3.hidden: attn={attn!r}; choose 'causal' or 'bidirectional'")
        causal = attn == "causal"
        if seg is not None:
            pos, mask = segment_positions(seg), build_mask(seg, seg, causal)
        else:
            real = None if attention_mask is None else attention_mask.bool()
            pos = positions_from_mask(real, idx.shape[1], idx.device)
            segs = padding_segments(real) if attn_mask is None else None
            mask = None if segs is None else build_mask(segs, segs, causal)
        if attn_mask is not None:
            mask = custom_mask(attn_mask.bool())
        if position_ids is not None:
            pos = position_ids
        x = self.embed(idx)
        cos, sin = self.rotary(pos, x.dtype)
        return self.decoder(x, cos, sin, attn, mask)

    def forward(self, idx, attention_mask=None, labels=None, position_ids=None, attn="causal", attn_mask=None,
                seg=None, reduction="mean", output="logits"):
        """labels are aligned with idx (labels[t] is the token after idx[t]), IGNORE_INDEX where unscored.
        With labels: (None, loss) computed without the full logits, the mean over scored tokens or, with
        reduction='sum', their sum; without: (logits, None), or (final hidden states, None) with
        output='hidden' (embedding objectives: through forward, so DDP and FSDP see the call)."""
        h = self.hidden(idx, attention_mask, position_ids, attn, attn_mask, seg)
        if output == "hidden":
            return h, None
        if labels is None:
            return F.linear(h, self.head_weight), None
        loss = kernels.linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.head_weight, labels.reshape(-1),
                                            IGNORE_INDEX, reduction=reduction)
        return None, loss

    @classmethod
    def from_pretrained(cls, hf_dir, dtype=torch.float32):
        """Load a Hugging Face Qwen3 checkpoint (single or sharded safetensors, tied or untied)."""
        cfg = ModelConfig.from_hf(hf_dir)
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(_load_qwen3_tensors(hf_dir, cfg, dtype), strict=True, assign=True)
        return model

    def save_pretrained(self, out_dir):
        """Write Hugging Face files (config.json + model.safetensors) that transformers loads."""
        os.makedirs(out_dir, exist_ok=True)
        c = self.cfg
        dtype = str(self.embed.weight.dtype).replace("torch.", "")
        hf_config = {
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
            "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "tie_word_embeddings": c.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
            "use_sliding_window": False, "bos_token_id": EOS_ID, "eos_token_id": EOS_ID,
            "torch_dtype": dtype, "dtype": dtype,
        }
        write_safetensors(os.path.join(out_dir, "model.safetensors"),
                          {to_hf_name(k): v for k, v in self.state_dict().items()})
        write_json(os.path.join(out_dir, "config.json"), hf_config)


# ---------------------------------------------------------------------------------------
# encoder-decoder

class EncoderDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.is_encoder_decoder:
            raise ValueError("EncoderDecoder needs num_encoder_layers > 0 (use Qwen3 for a decoder-only model)")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.encoder = Stack(cfg, cfg.num_encoder_layers)
        self.decoder = Stack(cfg, cfg.num_layers)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        self.apply(_init_weights)

    def set_activation_checkpointing(self, flag=True):
        self.encoder.activation_checkpointing = self.decoder.activation_checkpointing = flag

    def set_dropout(self, attn=0.0, hidden=0.0):
        set_dropout(self, attn, hidden)

    def encoder_positions(self, enc_ids, enc_mask=None, enc_seg=None):
        if enc_seg is not None:
            return segment_positions(enc_seg)
        return positions_from_mask(None if enc_mask is None else enc_mask.bool(), enc_ids.shape[1], enc_ids.device)

    def encode(self, enc_ids, enc_mask=None, enc_seg=None):
        """Final normed encoder states [B, S, C]; enc_mask [B, S] bool, True = real token; or enc_seg [B, S],
        the segment ids of packed examples (0 = padding): each example sees only itself."""
        segs = enc_seg if enc_seg is not None else padding_segments(None if enc_mask is None else enc_mask.bool())
        mask = None if segs is None else build_mask(segs, segs, causal=False)
        x = self.embed(enc_ids)
        cos, sin = self.rotary(self.encoder_positions(enc_ids, enc_mask, enc_seg), x.dtype)
        return self.encoder(x, cos, sin, "bidirectional", mask)

    def decoder_hidden(self, dec_ids, enc_out, enc_mask=None, cache=None, enc_seg=None, dec_seg=None):
        """Final normed decoder states. With a cache, dec_ids are only the new tokens (enc_out is needed on
        the first call only). Packed rows pass enc_seg and dec_seg: decoder segment k sees encoder segment k
        and its own causal prefix, positions restart per segment."""
        B, t = dec_ids.shape
        device = dec_ids.device
        start = cache.pos if cache is not None else 0
        x = self.embed(dec_ids)
        pos = segment_positions(dec_seg) if dec_seg is not None else torch.arange(start, start + t, device=device)
        enc_rope = None
        if self.cfg.enc_rope == "prefix":
            # a prefix LM: decoder positions continue after the real encoder tokens of the same example
            offset = None if cache is None else getattr(cache, "enc_offset", None)
            if offset is None:
                if enc_seg is not None:
                    ones = torch.ones_like(enc_seg)
                    counts = torch.zeros(B, enc_seg.shape[1] + 1, dtype=enc_seg.dtype, device=device)
                    offset = counts.scatter_add_(1, enc_seg, ones).gather(1, dec_seg)
                elif enc_mask is not None:
                    offset = enc_mask.long().sum(1, keepdim=True)
                else:
                    offset = torch.full((B, 1), enc_out.shape[1], device=device)
                if cache is not None:
                    cache.enc_offset = offset
            pos = pos + offset
            if enc_out is not None:
                enc_pos = self.encoder_positions(enc_out[..., 0], enc_mask, enc_seg)
                enc_rope = self.rotary(enc_pos, x.dtype)
        cos, sin = self.rotary(pos, x.dtype)
        if dec_seg is not None or enc_seg is not None:
            dseg = dec_seg if dec_seg is not None else torch.ones(B, t, dtype=torch.long, device=device)
            eseg = enc_seg if enc_seg is not None else torch.ones(B, enc_out.shape[1], dtype=torch.long, device=device)
            mask = build_mask(dseg, dseg, True, eseg)
        else:
            eseg = padding_segments(None if enc_mask is None else enc_mask.bool())
            ones = torch.ones(B, start + t, dtype=torch.long, device=device)
            mask = None if eseg is None else build_mask(ones[:, start:], ones, True, eseg)
        h = self.decoder(x, cos, sin, "merged", mask, enc_out=enc_out, enc_rope=enc_rope, cache=cache)
        if cache is not None:
            cache.pos += t
        return h

    def decode(self, dec_ids, enc_out, enc_mask=None, cache=None):
        """Logits [B, t, V] for dec_ids given the encoder states (cached after the first call)."""
        return F.linear(self.decoder_hidden(dec_ids, enc_out, enc_mask, cache), self.embed.weight)

    def new_cache(self):
        return KVCache(self.cfg.num_layers)

    def forward(self, enc_ids, enc_mask, dec_ids, labels=None, enc_seg=None, dec_seg=None, reduction="mean"):
        """With labels: (None, cross-entropy over labels != IGNORE_INDEX: their mean, or their sum with
        reduction='sum'), never holding [B, T, V] logits; without: (logits, None).
        Packed rows: enc_seg / dec_seg segment ids (enc_mask may then be None)."""
        enc_out = self.encode(enc_ids, enc_mask, enc_seg)
        h = self.decoder_hidden(dec_ids, enc_out, enc_mask, enc_seg=enc_seg, dec_seg=dec_seg)
        if labels is None:
            return F.linear(h, self.embed.weight), None
        loss = kernels.linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.embed.weight, labels.reshape(-1),
                                            IGNORE_INDEX, reduction=reduction)
        return None, loss

    # ---- conversion and checkpoints

    @classmethod
    def from_qwen3(cls, hf_dir, num_sentinels=100, dtype=torch.float32, seed=0):
        """Both stacks from one Qwen3 checkpoint's layers; new embedding rows for the sentinels.

        New rows (sentinels, and the UL2 mode-token rows that Qwen3 never trained) start at the mean of the
        rows the tokenizer actually emits plus a little seeded noise, so they sit where real tokens live
        and still differ from each other."""
        src = ModelConfig.from_hf(hf_dir)
        if src.vocab_size != QWEN3_VOCAB_SIZE:
            print(f"note: {hf_dir} has vocab {src.vocab_size}, not Qwen3's {QWEN3_VOCAB_SIZE}; "
                  f"sentinels go at ids {src.vocab_size}.. and the project tokenizer will not match", file=sys.stderr)
        if not src.tie_embeddings:
            print(f"note: {hf_dir} has an untied LM head; the encoder-decoder ties its head to the input embedding",
                  file=sys.stderr)
        cfg = replace(src, vocab_size=src.vocab_size + num_sentinels, num_encoder_layers=src.num_layers,
                      tie_embeddings=True)
        sd = _load_qwen3_tensors(hf_dir, src, dtype)
        sd.pop("lm_head.weight", None)
        state = {"embed.weight": _grow_embedding(sd.pop("embed.weight"), num_sentinels, seed)}
        for k, v in sd.items():  # decoder.* -> both stacks
            state[k] = v
            state["encoder." + k[len("decoder."):]] = v.clone()
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(state, strict=True, assign=True)
        return model

    def save_pretrained(self, out_dir):
        """model.safetensors + config.json (each written atomically). No pickled weights."""
        os.makedirs(out_dir, exist_ok=True)
        write_safetensors(os.path.join(out_dir, "model.safetensors"), self.state_dict())
        write_json(os.path.join(out_dir, "config.json"), {"model_type": "qwen3_encdec", **self.cfg.to_dict()})

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32):
        d = _read_config(path)
        if d.get("model_type") != "qwen3_encdec":
            raise ValueError(f"{path}: config.json has model_type={d.get('model_type')!r}, not 'qwen3_encdec'; "
                             "for a Hugging Face Qwen3 checkpoint use EncoderDecoder.from_qwen3")
        cfg = ModelConfig.from_dict(d)
        with torch.device("meta"):
            model = cls(cfg)
        sd = {k: v.to(dtype) for k, v in read_safetensors_dir(path).items()}
        model.load_state_dict(sd, strict=True, assign=True)
        return model


def _grow_embedding(weight, num_new, seed):
    used = weight[:min(EOS_ID, weight.shape[0])].float()
    mean, std = used.mean(0), used.std(0)
    g = torch.Generator().manual_seed(seed)

    def fresh(n):
        return (mean + 0.1 * std * torch.randn(n, weight.shape[1], generator=g)).to(weight.dtype)

    weight = weight.clone()
    mode_rows = [i for i in MODE_IDS.values() if i < weight.shape[0]]
    if mode_rows:
        weight[mode_rows] = fresh(len(mode_rows))
    return torch.cat([weight, fresh(num_new)], dim=0)


def load_any(path):
    """Our checkpoint dir, or a Hugging Face Qwen3 dir converted on the fly."""
    d = _read_config(path)
    if d.get("model_type") == "qwen3_encdec":
        return EncoderDecoder.from_pretrained(path)
    if d.get("model_type") == "qwen3":
        return EncoderDecoder.from_qwen3(path)
    raise ValueError(f"{path}: config.json model_type={d.get('model_type')!r} is neither 'qwen3_encdec' nor 'qwen3'")
