"""Model shapes: the ModelConfig dataclass, named presets, parameter and FLOP counts."""
import json
import os
from dataclasses import asdict, dataclass, fields

from tokenizer import NUM_SENTINELS, QWEN3_VOCAB_SIZE


@dataclass
class ModelConfig:
    vocab_size: int = QWEN3_VOCAB_SIZE + NUM_SENTINELS
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_layers: int = 28             # decoder layers (the whole model for decoder-only Qwen3)
    num_encoder_layers: int = 28     # 0 means decoder-only Qwen3
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_seq_len: int = 40960
    tie_embeddings: bool = True      # the encoder-decoder always ties; Qwen3 may not
    enc_rope: str = "prefix"         # encoder keys in merged attention: 'prefix' (rotated at their own positions,
                                     # decoder positions after them; the laptop ablation's winner) or 'none'
                                     # (unrotated, as T5Gemma2)

    def __post_init__(self):
        checks = [
            (self.num_heads % self.num_kv_heads == 0,
             f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} (grouped-query attention)"),
            (self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even (rotary embedding rotates pairs)"),
            (min(self.vocab_size, self.hidden_size, self.intermediate_size, self.num_layers,
                 self.num_heads, self.num_kv_heads, self.head_dim, self.max_seq_len) > 0,
             "vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim and "
             "max_seq_len must all be positive"),
            (self.num_encoder_layers >= 0, f"num_encoder_layers={self.num_encoder_layers} must be >= 0"),
            (self.rope_theta > 0, f"rope_theta={self.rope_theta} must be positive"),
            (self.enc_rope in ("none", "prefix"), f"enc_rope={self.enc_rope!r} must be 'none' or 'prefix'"),
            (self.tie_embeddings or not self.is_encoder_decoder,
             "the encoder-decoder shares one embedding matrix: tie_embeddings must be True"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")

    @property
    def is_encoder_decoder(self):
        return self.num_encoder_layers > 0

    # ---- serialisation

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - {"model_type", "architectures"}
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {sorted(unknown)}; valid keys are {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_hf(cls, path_or_dict):
        """A Hugging Face Qwen3 config.json (a file, its directory, or the parsed dict) as a decoder-only config."""
        d = path_or_dict
        if not isinstance(d, dict):
            path = os.path.join(d, "config.json") if os.path.isdir(d) else d
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: no Hugging Face config.json here; pass a Qwen3 checkpoint directory")
            with open(path) as f:
                d = json.load(f)
        # transformers 5 writes rope_theta inside rope_parameters; older configs at the top level
        rope = d.get("rope_parameters") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        if (rope.get("rope_type") or "default") != "default" or d.get("rope_scaling"):
            raise ValueError("ModelConfig.from_hf: only the default rotary embedding is supported "
                             f"(got rope_parameters={rope}, rope_scaling={d.get('rope_scaling')})")
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"], num_encoder_layers=0, num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads, rope_theta=float(theta),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), max_seq_len=d.get("max_position_embeddings", 40960),
            tie_embeddings=d.get("tie_word_embeddings", True))

    # ---- counts

    def _block_params(self):
        c, hd = self.hidden_size, self.head_dim
        attn = c * self.num_heads * hd * 2 + c * self.num_kv_heads * hd * 2 + 2 * hd  # q, o, k, v, q/k norms
        mlp = 3 * c * self.intermediate_size
        return attn + mlp + 2 * c  # + the two pre-norms

    def num_params(self):
        """Parameter counts: embedding, each stack (blocks + final norm), non-embedding, total."""
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_embeddings else emb
        enc = self.num_encoder_layers * self._block_params() + (self.hidden_size if self.is_encoder_decoder else 0)
        dec = self.num_layers * self._block_params() + self.hidden_size
        return {"embedding": emb, "lm_head": head, "encoder": enc, "decoder": dec,
                "non_embedding": enc + dec, "total": emb + head + enc + dec}

    def flops_per_example(self, enc_len, dec_len):
        """Training FLOPs (forward + backward = 3x forward) for one example of enc_len + dec_len tokens.

        Each weight multiply costs 2 FLOPs forward per token; attention adds QK^T and AV (2 x 2 x heads x
        head_dim per query-key pair). Encoder queries see enc_len keys; decoder queries see the encoder keys
        plus, on average, half the decoder keys (causal), counted in full as nanoGPT does."""
        blk = self._block_params()
        att = 4 * self.num_heads * self.head_dim
        enc = enc_len * (2 * blk + att * enc_len) * self.num_encoder_layers
        dec = dec_len * (2 * blk + att * (enc_len + dec_len)) * self.num_layers
        head = dec_len * 2 * self.vocab_size * self.hidden_size
        return 3 * (enc + dec + head)

    def flops_per_token(self, enc_len, dec_len):
        """Training FLOPs per token of (enc_len + dec_len): what MFU divides by."""
        return self.flops_per_example(enc_len, dec_len) / (enc_len + dec_len)


def _qwen3_like(hidden, d_ff, layers, heads, kv_heads, encdec, vocab=None):
    return ModelConfig(vocab_size=vocab or (QWEN3_VOCAB_SIZE + NUM_SENTINELS if encdec else QWEN3_VOCAB_SIZE),
                       hidden_size=hidden, intermediate_size=d_ff, num_layers=layers,
                       num_encoder_layers=layers if encdec else 0, num_heads=heads, num_kv_heads=kv_heads,
                       head_dim=128)


PRESETS = {
    # exactly Qwen3-0.6B
    "qwen3_0.6b": lambda: _qwen3_like(1024, 3072, 28, 16, 8, encdec=False),
    # 28 + 28 layers from Qwen3-0.6B, vocab 151,936 + 100 sentinels
    "qwen3_encdec_0.6b": lambda: _qwen3_like(1024, 3072, 28, 16, 8, encdec=True),
    # scaled Qwen3-style stacks (Qwen3-1.7B widths; a 2304-wide variant with 18 heads of 128)
    "qwen3_encdec_1.5b": lambda: _qwen3_like(2048, 6144, 28, 16, 8, encdec=True),
    "qwen3_encdec_2b": lambda: _qwen3_like(2304, 6912, 28, 18, 9, encdec=True),
    # tiny shapes for tests and CPU runs (full vocabulary, so ids stay real Qwen3 ids)
    "tiny": lambda: ModelConfig(vocab_size=QWEN3_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_layers=2, num_encoder_layers=0,
                                num_heads=4, num_kv_heads=2, head_dim=16, max_seq_len=2048),
    "tiny_encdec": lambda: ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_encoder_layers=2,
                                       num_heads=4, num_kv_heads=2, head_dim=16, max_seq_len=2048),
}


def get_preset(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return ModelConfig.from_dict({**cfg.to_dict(), **overrides}) if overrides else cfg


if __name__ == "__main__":
    # python model_config.py qwen3_encdec_0.6b  -> parameter counts
    import sys
    names = sys.argv[1:] or sorted(PRESETS)
    if {"-h", "--help"} & set(names):
        print(f"usage: python model_config.py [PRESET ...]  (parameter counts; presets: {', '.join(sorted(PRESETS))})")
        sys.exit(0)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:  # one line, not a traceback
        sys.exit(f"model_config.py: unknown preset {unknown[0]!r}; choose from {', '.join(sorted(PRESETS))}")
    for name in names:
        counts = get_preset(name).num_params()
        print(f"{name:20s} " + "  ".join(f"{k}={v / 1e6:,.1f}M" for k, v in counts.items()))
