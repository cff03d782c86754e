"""Ship the encoder of a training checkpoint as a standalone text-embedding directory.

    python extract.py --ckpt out/ckpt-0005000 --out out/encoder --pooling mean --verify
    python extract.py --ckpt out --average_last 5 --out out/encoder     # mean of the last 5 checkpoints
    python extract.py --ckpt out/contrastive --out out/encoder --verify  # pooling, prompts, dims from the run

--ckpt is a checkpoint directory (model.safetensors + config.json, as EncoderDecoder.save_pretrained
writes), a training out_dir (its latest ckpt-XXXXXXX, or the last N with --average_last N), or a Hugging
Face Qwen3 directory: contrastive.py's checkpoints (the trained embedding model), or a Qwen3 as released
(the encoder as initialised, before any training: a baseline).

The directory holds
  model.safetensors      embed.weight and encoder.* under the checkpoint's own names
  config.json            model_type "qwen3_encoder", shapes, pooling, normalize, max_seq_length, auto_map,
                         truncate_dim (null), matryoshka_dims and prompts of a contrastive run
  hf_encoder.py          the modeling file transformers runs with trust_remote_code
  tokenizer.json, tokenizer_config.json    (tokenizer.save_hf, right padding)
  modules.json, sentence_bert_config.json, 1_Pooling/, 2_Normalize/, config_sentence_transformers.json
                         (with the prompts)   for sentence-transformers
and loads three ways with the same embeddings (--verify checks it, |diff| <= 1e-5, also at the smallest
Matryoshka width and with each prompt):
  eval_embed.Encoder.from_pretrained(dir, truncate_dim=None).encode(texts, prompt=None)       this project
  AutoModel.from_pretrained(dir, trust_remote_code=True, truncate_dim=None)(...).pooler_output transformers
  SentenceTransformer(dir, trust_remote_code=True, truncate_dim=None).encode(texts, prompt_name=None,
                      normalize_embeddings=True)                                             sentence-transformers
(sentence-transformers truncates after its Normalize module: at a truncate_dim pass normalize_embeddings=True
for unit vectors; cosine similarity is the same either way). Texts are embedded as their tokens, no eos; a
prompt is text prepended to the text (special tokens allowed: '<|ul2_S|>' is one token). A contrastive run's
mode token is the 'default' prompt: this project and sentence-transformers (default_prompt_name) put it before
every text asked for with no prompt; with transformers, prepend config.prompts['default'] yourself.
"""
import argparse
import json
import os
import shutil
import sys

import torch

import checkpoint
import eval_embed

MODEL_TYPE = eval_embed.MODEL_TYPE  # the directory loads through eval_embed.load_encoder_dir
POOLINGS = ("mean", "cls", "last")
HERE = os.path.dirname(os.path.abspath(__file__))
VERIFY_TEXTS = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog while the farmer watches from a distance.",
    "你好，世界！",
    "x",
    "Embeddings should not depend on how much padding sits next to a sentence in its batch, "
    "which is why this one is much longer than the others in the list.",
]


def fail(msg):
    print(f"extract: {msg}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------------------------------
# reading checkpoints

def resolve_checkpoints(ckpt, average_last=1):
    """--ckpt and --average_last -> the checkpoint directories to read: a checkpoint as it is, or the newest
    complete one(s) of a training out_dir (checkpoint.py's rule; damaged or unconsolidated ones are skipped)."""
    if not os.path.isdir(ckpt):
        raise FileNotFoundError(f"--ckpt {ckpt}: no such directory")
    ckpts = checkpoint.list_checkpoints(ckpt)
    if ckpts and not os.path.isfile(os.path.join(ckpt, "config.json")):
        if average_last == 1:
            return [checkpoint.newest(ckpt, weights=True)]
        complete = []
        for p in ckpts:
            try:
                checkpoint.check(p, weights=True)
                complete.append(p)
            except checkpoint.CheckpointError:
                pass
        if average_last > len(complete):
            raise ValueError(f"--average_last {average_last}: {ckpt} has only {len(complete)} complete checkpoints")
        return complete[-average_last:]
    if average_last > 1:
        raise ValueError(f"--average_last {average_last} needs a training out_dir holding ckpt-XXXXXXX "
                         f"directories; {ckpt} has none")
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        raise FileNotFoundError(f"--ckpt {ckpt}: neither a checkpoint (config.json + model.safetensors) "
                                "nor an out_dir with ckpt-XXXXXXX directories")
    checkpoint.check(ckpt, weights=True)
    return [ckpt]


def encoder_tensors(path):
    """(ModelConfig, {embed.weight, encoder.*}) of one checkpoint; a Qwen3 directory is converted."""
    import model as M
    from model_config import ModelConfig
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    if d.get("model_type") == "qwen3":
        import tokenizer as tok
        from dataclasses import replace
        src = ModelConfig.from_hf(d)
        if src.vocab_size < tok.VOCAB_SIZE:  # a Qwen3 as released: rows for the sentinels are added
            m = M.EncoderDecoder.from_qwen3(path)
            return m.cfg, {k: v for k, v in m.state_dict().items() if k == "embed.weight" or k.startswith("encoder.")}
        # one of ours already holding every row (contrastive.py's checkpoints): its layers as they are
        sd = {M.from_hf_name(k): v for k, v in M.read_safetensors_dir(path).items()}
        keep = {("encoder." + k[len("decoder."):] if k.startswith("decoder.") else k): v for k, v in sd.items()
                if k == "embed.weight" or k.startswith("decoder.")}
        return replace(src, num_encoder_layers=src.num_layers, tie_embeddings=True), keep
    if d.get("model_type") != "qwen3_encdec":
        raise ValueError(f"{path}/config.json: model_type {d.get('model_type')!r} is neither 'qwen3_encdec' "
                         "(a training checkpoint) nor 'qwen3'")
    cfg = ModelConfig.from_dict(d)
    sd = M.read_safetensors_dir(path)
    keep = {k: v for k, v in sd.items() if k == "embed.weight" or k.startswith("encoder.")}
    if "embed.weight" not in keep or not any(k.startswith("encoder.") for k in keep):
        raise ValueError(f"{path}: no embed.weight / encoder.* tensors; is this an EncoderDecoder checkpoint?")
    return cfg, keep


def average_checkpoints(paths):
    """Element-wise mean of the encoder tensors of several checkpoints (accumulated in fp64)."""
    cfg, acc = encoder_tensors(paths[0])
    dtypes = {k: v.dtype for k, v in acc.items()}
    acc = {k: v.double() for k, v in acc.items()}
    for p in paths[1:]:
        c, sd = encoder_tensors(p)
        if c != cfg or set(sd) != set(acc):
            raise ValueError(f"{p}: its config or tensor names differ from {paths[0]}; only average one run")
        for k, v in sd.items():
            acc[k] += v.double()
    return cfg, {k: (v / len(paths)).to(dtypes[k]) for k, v in acc.items()}


# ---------------------------------------------------------------------------------------
# writing

def write_json(path, obj):
    """Inside the temporary directory that checkpoint.publish makes appear whole."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_encoder_dir(out, cfg, tensors, pooling="mean", normalize=True, max_len=512, sources=(), prompts=None,
                      matryoshka_dims=()):
    """Write every file of the exported directory into `out` (a fresh directory). prompts: {'default': ...,
    'query': ..., 'document': ...} texts to prepend (sentence-transformers' prompt_name; 'default' is its
    default_prompt_name, put before every text no other prompt is asked for); matryoshka_dims: the prefix widths
    the model was trained for (recorded; any truncate_dim works)."""
    from safetensors.torch import save_file
    import tokenizer as tok
    if pooling not in POOLINGS:
        raise ValueError(f"--pooling must be one of {POOLINGS}, got {pooling!r}")
    os.makedirs(out, exist_ok=True)
    tokenizer = tok.load_tokenizer()
    dtype = str(tensors["embed.weight"].dtype).replace("torch.", "")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
              os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    max_len = min(max_len, cfg.max_seq_len)
    write_json(os.path.join(out, "config.json"), {
        "model_type": MODEL_TYPE, "architectures": ["Qwen3EncoderModel"],
        "auto_map": {"AutoConfig": "hf_encoder.Qwen3EncoderConfig", "AutoModel": "hf_encoder.Qwen3EncoderModel"},
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_encoder_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_seq_len,
        "pooling": pooling, "normalize": normalize, "max_seq_length": max_len,
        "pad_token_id": tok.PAD_ID, "eos_token_id": tok.EOS_ID, "dtype": dtype,
        "tokenizer_fingerprint": tokenizer.fingerprint, "truncate_dim": None,
        "matryoshka_dims": [int(d) for d in matryoshka_dims], "prompts": prompts,
        "extracted_from": [os.path.abspath(s) for s in sources],
    })
    shutil.copy(os.path.join(HERE, "hf_encoder.py"), os.path.join(out, "hf_encoder.py"))
    tokenizer.save_hf(out, model_max_length=max_len)
    tc_path = os.path.join(out, "tokenizer_config.json")
    with open(tc_path) as f:
        tc = json.load(f)
    tc["padding_side"] = "right"  # mean/cls/last pooling are padding-side agnostic; right is the convention
    write_json(tc_path, tc)
    # sentence-transformers: transformer -> pooling -> (normalise)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        os.makedirs(os.path.join(out, "2_Normalize"), exist_ok=True)
    write_json(os.path.join(out, "modules.json"), modules)
    write_json(os.path.join(out, "sentence_bert_config.json"), {"max_seq_length": max_len, "do_lower_case": False})
    os.makedirs(os.path.join(out, "1_Pooling"), exist_ok=True)
    # the classic keys, which both old and new sentence-transformers read
    keys = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "last": "pooling_mode_lasttoken"}
    write_json(os.path.join(out, "1_Pooling", "config.json"),
               {"word_embedding_dimension": cfg.hidden_size, **{k: p == pooling for p, k in keys.items()}})
    st = {"similarity_fn_name": "cosine"}
    if prompts:
        st.update(prompts=prompts, default_prompt_name="default" if prompts.get("default") else None)
    write_json(os.path.join(out, "config_sentence_transformers.json"), st)


# ---------------------------------------------------------------------------------------
# verification: the three loaders agree

def three_loaders(path):
    """This project's Encoder, transformers' (tokenizer, model) and sentence-transformers' model of a directory."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer
    ours = eval_embed.Encoder.from_pretrained(path)
    hf = (AutoTokenizer.from_pretrained(path, trust_remote_code=True),
          AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval())
    st = SentenceTransformer(path, device="cpu", trust_remote_code=True, model_kwargs={"dtype": torch.float32})
    return ours, hf, st


def embed_three_ways(path, texts=VERIFY_TEXTS, truncate_dim=None, prompt_name=None, loaders=None):
    """{loader: float32 numpy [N, C]} for this project, transformers and sentence-transformers (all fp32).
    truncate_dim: the Matryoshka prefix, normalised (sentence-transformers truncates after its Normalize
    module, so it is asked to normalise again). prompt_name: a prompt of the directory ('query', 'document')
    prepended to every text; None: each loader as a user calls it with no prompt (this project and
    sentence-transformers apply the directory's default prompt themselves, transformers is given it)."""
    import numpy as np
    ours, (hf_tok, hf_model), st = loaders or three_loaders(path)
    texts = list(texts)
    prompt = ours.prompts[prompt_name] if prompt_name else None
    ours.truncate_dim = hf_model.config.truncate_dim = truncate_dim
    out = {"project": ours.encode(texts, batch_size=len(texts), prompt=prompt)}
    hf_prompt = prompt if prompt_name else (hf_model.config.prompts or {}).get("default", "")
    with torch.inference_mode():
        batch = hf_tok([hf_prompt + t for t in texts], padding=True, truncation=True, return_tensors="pt")
        out["transformers"] = hf_model(**batch).pooler_output.float().numpy()
    out["sentence-transformers"] = np.asarray(
        st.encode(texts, batch_size=len(texts), prompt_name=prompt_name, truncate_dim=truncate_dim,
                  normalize_embeddings=truncate_dim is not None), dtype=np.float32)
    return out


def verify(path, tol=1e-5, truncate_dims=(), prompt_names=()):
    """Max |difference| of each loader from this project's embeddings, at the full width and at each of
    truncate_dims, plain and with each prompt; raises if any exceeds tol."""
    loaders = three_loaders(path)
    diffs = {}
    for dim in [None, *truncate_dims]:
        for prompt_name in [None, *prompt_names]:
            embs = embed_three_ways(path, truncate_dim=dim, prompt_name=prompt_name, loaders=loaders)
            tag = (f"@{dim}" if dim else "") + (f" {prompt_name}" if prompt_name else "")
            ref = embs["project"]
            diffs.update({k + tag: float(abs(v - ref).max()) for k, v in embs.items() if k != "project"})
    bad = {k: d for k, d in diffs.items() if not d <= tol}
    if bad:
        raise ValueError(f"{path}: loaders disagree with this project's embeddings: {bad} (tolerance {tol})")
    return diffs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint dir, training out_dir, or Hugging Face Qwen3 dir")
    p.add_argument("--out", required=True, help="the encoder directory to write")
    p.add_argument("--pooling", default=None, choices=POOLINGS,
                   help="default: the contrastive run's contrastive_pooling, else mean")
    p.add_argument("--default_prompt", default=None, help="text prepended to every text no other prompt is asked "
                   "for, STS included (prompt_name 'default'); default: the contrastive run's mode token")
    p.add_argument("--query_prompt", default=None, help="the whole text prepended to queries (prompt_name 'query'); "
                   "default: the run's mode token + contrastive_query_prefix")
    p.add_argument("--doc_prompt", default=None, help="the whole text prepended to documents (prompt_name "
                   "'document'); default: the run's mode token + contrastive_doc_prefix")
    p.add_argument("--no_normalize", action="store_true", help="leave embeddings unnormalised")
    p.add_argument("--average_last", type=int, default=1, help="average the last N checkpoints of an out_dir")
    p.add_argument("--max_len", type=int, default=512, help="token limit the loaders truncate to")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (auto: the checkpoint's)")
    p.add_argument("--verify", action="store_true", help="check the three loaders agree before finishing")
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")
    args = p.parse_args(argv)
    if args.average_last < 1:
        fail(f"--average_last {args.average_last}: must be >= 1")
    if os.path.exists(args.out) and not args.force:
        fail(f"--out {args.out} exists; pass --force to replace it")
    try:
        paths = resolve_checkpoints(args.ckpt, args.average_last)
        print("reading " + ", ".join(paths))
        cfg, tensors = average_checkpoints(paths)
    except (OSError, ValueError) as e:
        fail(str(e))
    if args.dtype != "auto":
        tensors = {k: v.to(getattr(torch, args.dtype)) for k, v in tensors.items()}
    # a contrastive run decides how its embeddings are read: pooling, prompts, Matryoshka widths
    run = eval_embed.contrastive_run_config(paths[-1]) or {}
    pooling = args.pooling or run.get("contrastive_pooling", "mean")
    try:
        prompts = eval_embed.run_prompts(run)
    except ValueError as e:
        fail(f"{paths[-1]}/trainer_state.json: {e}")
    for name, given in (("default", args.default_prompt), ("query", args.query_prompt), ("document", args.doc_prompt)):
        if given is not None:
            prompts[name] = given
    prompts = {k: v for k, v in prompts.items() if v} or None
    dims = [d for d in run.get("contrastive_matryoshka_dims", []) if d < cfg.hidden_size]
    tmp = args.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_encoder_dir(tmp, cfg, tensors, pooling, not args.no_normalize, args.max_len, paths, prompts, dims)
        if args.verify:
            diffs = verify(tmp, truncate_dims=dims[-1:], prompt_names=[k for k in prompts or {} if k != "default"])
            print("verify: max |diff| from this project's embeddings " +
                  ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    except (OSError, ValueError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        fail(str(e))
    checkpoint.publish(tmp, args.out)  # an existing --out is replaced only by a complete new one
    n = sum(v.numel() for v in tensors.values())
    print(f"wrote {args.out}: {cfg.num_encoder_layers} encoder layers, {n / 1e6:.1f}M parameters, "
          f"pooling {pooling}{'' if args.no_normalize else ', normalised'}"
          + (f", Matryoshka dims {dims}" if dims else "") + (f", prompts {prompts}" if prompts else ""))


if __name__ == "__main__":
    main()
