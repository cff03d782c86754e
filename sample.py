"""Look at what an encoder-decoder learned: span infilling (R/X modes) and continuation (S mode); or what a
masked-diffusion Qwen3 writes (--mode diffusion, diffusion.generate).

    python sample.py --ckpt out/ckpt-0001000 --prompt "The <extra_id_0> sat on the <extra_id_1>."
    python sample.py --ckpt out --mode S --prompt "ROMEO:" --temperature 0.8 --top_k 200
    python sample.py --ckpt /path/to/Qwen3-0.6B --prompt_file prompts.txt --num_samples 3 --temperature 1
    python sample.py --ckpt out-diffusion --mode diffusion --chat --prompt "Who wrote Hamlet?" --steps 64 \
        --max_new_tokens 64 --block_length 32 --threshold 0.9 --cache prefix

Infilling: the encoder reads <|ul2_R|> + the prompt with its sentinels; the decoder writes
<extra_id_0> span <extra_id_1> span ... <|endoftext|>, and each sentinel of the prompt is replaced by
its span. Continuation: the encoder reads <|ul2_S|> + the prefix; the decoder writes what follows.
The encoder runs once per prompt; the decoder projects the encoder keys/values once and then feeds
one new token per step through its key-value cache.
"""
import argparse
import os
import re
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
from tokenizer import DECODER_START_ID, EOS_ID, MODE_IDS, NUM_SENTINELS, PAD_ID, SENTINEL_START

SENTINEL_TEXT = re.compile(r"<extra_id_(\d+)>")


# ---------------------------------------------------------------------------------------
# generation

def sample_next(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """Next token ids [B] from logits [B, V]; temperature 0 is greedy.

    The draw is one uniform number per row (from `generator`, on the CPU) pushed through the
    cumulative distribution, so two callers whose logits agree to rounding, on any device, consume
    the generator identically and pick the same tokens."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    ids = None  # token ids of the candidate columns when they are a sorted subset of the vocabulary
    if 0 < top_k < logits.shape[-1]:
        logits, ids = logits.topk(top_k, dim=-1)  # sorted, so top_p below needs no sort of its own
    probs = logits.softmax(-1)
    if top_p < 1.0:
        if ids is None:
            probs, ids = probs.sort(-1, descending=True)
        # nucleus: keep the most likely tokens until their mass reaches top_p (always at least one)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator).to(cdf.device) * cdf[:, -1:]
    # column i owns [cdf[i-1], cdf[i]); a column of probability 0 owns nothing
    pick = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
    return (pick if ids is None else ids.gather(-1, pick)).squeeze(-1)


@torch.no_grad()
def generate(model, enc_ids, enc_mask, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, generator=None,
             use_cache=True, eos_id=EOS_ID):
    """Decoder tokens for each row of a batch of encoder inputs, EOS excluded -> list of lists.

    enc_ids [B, S] (padded on either side), enc_mask [B, S] bool, True = real token. The decoder
    needs no padding: every row starts from DECODER_START_ID and moves in lockstep; a row that has
    emitted EOS keeps feeding EOS until all rows are done. use_cache=False recomputes the whole
    decoder every step (the reference the cache is tested against); eos_id=None never stops early."""
    B, device = enc_ids.shape[0], enc_ids.device
    enc_out = model.encode(enc_ids, enc_mask)
    cache = model.new_cache() if use_cache else None
    dec = torch.full((B, 1), DECODER_START_ID, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if use_cache:  # the first call projects the encoder keys/values into the cache
            h = model.decoder_hidden(dec[:, -1:], enc_out if step == 0 else None, enc_mask, cache)
        else:
            h = model.decoder_hidden(dec, enc_out, enc_mask)
        logits = F.linear(h[:, -1], model.embed.weight)  # the LM head on the newest position only
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            nxt = nxt.masked_fill(done, eos_id)
            done |= nxt == eos_id
        dec = torch.cat([dec, nxt[:, None]], dim=1)
        if eos_id is not None and bool(done.all()):
            break
    out = []
    for row in dec[:, 1:].tolist():
        out.append(row[:row.index(eos_id)] if eos_id in row else row)
    return out


def pad_batch(seqs, pad_id=PAD_ID, side="right"):
    """Lists of ids -> (ids [B, S], mask [B, S] bool) padded on `side` (the encoder masks padding either way)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = True
    return ids, mask


# ---------------------------------------------------------------------------------------
# prompts and spans

def is_sentinel(t):
    return SENTINEL_START <= t < SENTINEL_START + NUM_SENTINELS


def encode_prompt(tok, text, what="prompt"):
    """Text with <extra_id_N> markers -> ids. Sentinels are cut out here, so the BPE never sees them
    and an out-of-range or repeated one is caught with a clear message.

    One space right before a sentinel is dropped: the byte-level BPE puts a word's space in front of
    it, so in training "The cat sat" masked at " cat" reads "The<extra_id_0> sat" and the model writes
    the span as " cat". "The <extra_id_0> sat" thus means what a reader expects."""
    parts = SENTINEL_TEXT.split(text)
    ids, seen = [], set()
    for i, part in enumerate(parts):
        if i % 2 == 0:
            if i + 1 < len(parts) and part.endswith(" "):
                part = part[:-1]
            ids += tok.encode(part) if part else []
            continue
        n = int(part)
        if n >= NUM_SENTINELS:
            raise ValueError(f"{what}: <extra_id_{n}> is out of range; sentinels are <extra_id_0> .. "
                             f"<extra_id_{NUM_SENTINELS - 1}>")
        if n in seen:
            raise ValueError(f"{what}: <extra_id_{n}> appears twice; give each masked span its own sentinel")
        seen.add(n)
        ids.append(SENTINEL_START + n)
    return ids


def split_spans(target):
    """Decoder output `<extra_id_a> span <extra_id_b> span ...` -> {sentinel id: span ids}.
    Tokens before the first sentinel belong to no span and are dropped; a repeated sentinel keeps its first span."""
    spans, current = {}, None
    for t in target:
        if is_sentinel(t):
            current = None if t in spans else spans.setdefault(t, [])
        elif current is not None:
            current.append(t)
    return spans


def fill_spans(prompt_ids, target):
    """The prompt with each sentinel replaced by its generated span; a sentinel the model skipped stays."""
    spans = split_spans(target)
    out = []
    for t in prompt_ids:
        out += spans.get(t, [t]) if is_sentinel(t) else [t]
    return out


def resolve_ckpt(path):
    """A checkpoint dir (ours or Hugging Face Qwen3) as is; a training out_dir -> its newest complete ckpt-*
    (checkpoint.py's one rule: a half-written or damaged checkpoint is skipped, with a note saying which)."""
    try:
        return checkpoint.resolve(path, weights=True, log=lambda msg: print(msg, file=sys.stderr))
    except checkpoint.CheckpointError as e:
        raise ValueError(f"--ckpt {e}") from None


# ---------------------------------------------------------------------------------------
# command line

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint dir, training out_dir (newest ckpt-*) or Qwen3 HF dir")
    p.add_argument("--prompt", help="one prompt; <extra_id_N> marks a span to fill")
    p.add_argument("--prompt_file", help="a UTF-8 file with one prompt per line (blank lines skipped)")
    p.add_argument("--mode", default="R", choices=sorted(MODE_IDS) + ["diffusion"],
                   help="R/X: fill spans; S: continue the prefix; diffusion: a masked-diffusion Qwen3 writes "
                        "--max_new_tokens after the prompt")
    d = p.add_argument_group("--mode diffusion (diffusion.generate)")
    d.add_argument("--steps", type=int, default=0, help="denoising steps over all blocks (0 = max_new_tokens)")
    d.add_argument("--block_length", type=int, default=0, help="semi-autoregressive block (0 = max_new_tokens)")
    d.add_argument("--cfg_scale", type=float, default=0.0, help="classifier-free guidance (0 = off)")
    d.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random", "random_topk"])
    d.add_argument("--threshold", type=float, default=None, help="commit every token this confident (Fast-dLLM)")
    d.add_argument("--cache", default=None, choices=["prefix", "dual"], help="per-block key-value cache")
    d.add_argument("--block_attention", action="store_true", help="block attention (a model trained with it)")
    d.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template of the SFT data")
    d.add_argument("--system", default="", help="system prompt for --chat")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--show_target", action="store_true", help="also print the raw decoder output")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the project tokenizer)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    args = p.parse_args(argv)
    checks = [(args.max_new_tokens >= 1, "--max_new_tokens must be >= 1"),
              (args.num_samples >= 1, "--num_samples must be >= 1"),
              (args.batch_size >= 1, "--batch_size must be >= 1"),
              (args.temperature >= 0, "--temperature must be >= 0 (0 = greedy)"),
              (args.top_k >= 0, "--top_k must be >= 0 (0 = off)"),
              (0 < args.top_p <= 1, "--top_p must lie in (0, 1]"),
              ((args.prompt is None) != (args.prompt_file is None), "give exactly one of --prompt and --prompt_file")]
    if args.mode == "diffusion":
        args.steps = args.steps or args.max_new_tokens
        args.block_length = args.block_length or args.max_new_tokens
        checks += [(args.max_new_tokens % args.block_length == 0, "--max_new_tokens must be a multiple of --block_length"),
                   (args.threshold is not None or args.steps % max(args.max_new_tokens // args.block_length, 1) == 0,
                    "--steps must be a multiple of the number of blocks (max_new_tokens / block_length)"),
                   (args.steps >= 1 and args.block_length >= 1, "--steps and --block_length must be >= 1"),
                   (args.top_k == 0 and args.top_p == 1.0, "--top_k / --top_p are not used by --mode diffusion")]
    for ok, msg in checks:
        if not ok:
            p.error(msg)
    return args


def read_prompts(args):
    if args.prompt is not None:
        return [args.prompt]
    if not os.path.isfile(args.prompt_file):
        raise ValueError(f"--prompt_file {args.prompt_file}: no such file")
    with open(args.prompt_file, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"--prompt_file {args.prompt_file}: no prompts (one per line)")
    return prompts


def load_model(path, device, dtype):
    from model import load_any
    return load_any(path).to(device=device, dtype=dtype).eval()  # rotary frequencies stay fp32


def prepare(args):
    """Everything that can fail on bad input, before any generation: (model, tokenizer, encoder inputs)."""
    path = resolve_ckpt(args.ckpt)
    texts = read_prompts(args)
    from tokenizer import load_tokenizer
    tok = load_tokenizer(args.tokenizer)
    if args.mode == "diffusion":
        return prepare_diffusion(args, path, texts, tok)
    infill = args.mode != "S"
    prompts = []
    for i, text in enumerate(texts):
        what = "--prompt" if args.prompt is not None else f"{args.prompt_file} line {i + 1}"
        ids = encode_prompt(tok, text, what)
        has_sentinel = any(is_sentinel(t) for t in ids)
        if infill and not has_sentinel:
            raise ValueError(f"{what}: no <extra_id_N> to fill in mode {args.mode}; mark a span with "
                             "<extra_id_0> or use --mode S to continue the text")
        if not infill and has_sentinel:
            raise ValueError(f"{what}: --mode S continues a prefix; remove the <extra_id_N> markers or use --mode R")
        prompts.append(ids)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    model = load_model(path, args.device, getattr(torch, dtype))
    limit = model.cfg.max_seq_len
    for i, ids in enumerate(prompts):
        if len(ids) + 1 > limit:  # + the mode token
            what = "--prompt" if args.prompt is not None else f"{args.prompt_file} line {i + 1}"
            raise ValueError(f"{what}: {len(ids)} tokens + the mode token exceed the model's max_seq_len={limit}; "
                             "shorten the prompt")
    if args.max_new_tokens + 1 > limit:
        raise ValueError(f"--max_new_tokens {args.max_new_tokens} exceeds the model's max_seq_len={limit} (minus 1)")
    return model, tok, prompts, path


def prepare_diffusion(args, path, texts, tok):
    """--mode diffusion: a decoder-only Qwen3 (a Hugging Face dir, e.g. a diffusion training checkpoint)."""
    import diffusion
    from model import Qwen3, _read_config
    if _read_config(path).get("model_type") != "qwen3":
        raise ValueError(f"--ckpt {path}: --mode diffusion needs a decoder-only Qwen3 checkpoint "
                         "(config.json model_type 'qwen3'), such as a train.py objective='diffusion' checkpoint")
    prompts = []
    for i, text in enumerate(texts):
        what = "--prompt" if args.prompt is not None else f"{args.prompt_file} line {i + 1}"
        ids = diffusion.chat_ids(tok, args.system, [], text) if args.chat else tok.encode(text, allow_special=False)
        if not ids:
            raise ValueError(f"{what}: empty prompt")
        prompts.append(ids)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    model = Qwen3.from_pretrained(path).to(device=args.device, dtype=getattr(torch, dtype)).eval()
    limit = model.cfg.max_seq_len
    for i, ids in enumerate(prompts):
        if len(ids) + args.max_new_tokens > limit:
            what = "--prompt" if args.prompt is not None else f"{args.prompt_file} line {i + 1}"
            raise ValueError(f"{what}: {len(ids)} prompt tokens + --max_new_tokens {args.max_new_tokens} exceed "
                             f"the model's max_seq_len={limit}")
    if diffusion.MASK_ID >= model.cfg.vocab_size:
        raise ValueError(f"--ckpt {path}: vocabulary of {model.cfg.vocab_size} rows has no mask token "
                         f"{diffusion.MASK_ID}")
    return model, tok, prompts, path


def diffusion_text(ids):
    """Generated ids up to the first end-of-text / end-of-turn."""
    import diffusion
    for stop in (EOS_ID, diffusion.EOT_ID):
        if stop in ids:
            ids = ids[:ids.index(stop)]
    return ids


def main_diffusion(args, model, tok, prompts, generator):
    import diffusion
    rows = [ids for ids in prompts for _ in range(args.num_samples)]
    out = []
    for i in range(0, len(rows), args.batch_size):
        batch = rows[i:i + args.batch_size]
        ids, mask = pad_batch(batch, side="left")  # the generated block starts at the same column in every row
        x = diffusion.generate(model, ids.to(args.device), mask.to(args.device), steps=args.steps,
                               gen_length=args.max_new_tokens, block_length=args.block_length,
                               temperature=args.temperature, cfg_scale=args.cfg_scale, remasking=args.remasking,
                               threshold=args.threshold, cache=args.cache, block_attention=args.block_attention,
                               generator=generator)
        out += [(p, diffusion_text(row)) for p, row in zip(batch, x[:, ids.shape[1]:].tolist())]
    for n, (ids, target) in enumerate(out):
        if n:
            print("-" * 40)
        print(tok.decode(target) if args.chat else tok.decode(ids + target))
        if args.show_target:
            print("target: " + tok.decode(target))


def main(argv=None):
    args = parse_args(argv)
    try:
        model, tok, prompts, path = prepare(args)
    except (ValueError, OSError) as e:  # OSError: unreadable files
        sys.exit("sample.py: " + str(e).replace("\n", " "))
    print(f"# {path} on {args.device}, mode {args.mode}", file=sys.stderr)
    generator = torch.Generator().manual_seed(args.seed)
    if args.mode == "diffusion":
        return main_diffusion(args, model, tok, prompts, generator)
    mode_id = MODE_IDS[args.mode]
    rows = [ids for ids in prompts for _ in range(args.num_samples)]
    batches = [rows[i:i + args.batch_size] for i in range(0, len(rows), args.batch_size)]
    results = []
    for batch in tqdm(batches, desc="sampling", disable=len(batches) < 2, file=sys.stderr):
        enc_ids, enc_mask = pad_batch([[mode_id] + ids for ids in batch])
        targets = generate(model, enc_ids.to(args.device), enc_mask.to(args.device), args.max_new_tokens,
                           args.temperature, args.top_k, args.top_p, generator)
        results += zip(batch, targets)
    for n, (ids, target) in enumerate(results):
        if n:
            print("-" * 40)
        shown = fill_spans(ids, target) if args.mode != "S" else ids + target
        print(tok.decode(shown))
        if args.show_target:
            print("target: " + tok.decode(target))


if __name__ == "__main__":
    main()
