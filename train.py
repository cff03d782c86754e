"""Training, nanoGPT style: UL2 on the Qwen3 encoder-decoder, or any objective that plugs in.

    python data/shakespeare_qwen3/prepare.py && python train.py config/tiny_shakespeare.py
    torchrun --nproc_per_node=8 train.py config/qwen3_encdec_0.6b.py

The defaults are the globals below (and each objective's CONFIG). A config file named on the
command line is exec'd over them, then --key=value arguments override both (configurator.py).

An objective (ul2.py, causal.py, ...; the table OBJECTIVES) turns rows of the run's example
stream into batches and a batch into (summed loss, count); this loop never branches on it. The
loss is token-weighted over the whole global batch: gradients of the summed losses of every
micro-step in every process, divided once by the global count. Under torchrun the processes split
each iteration's micro-batches between them (ddp, zero1 or fsdp); the global batch, and so the
losses, do not depend on batch_size x grad_accum x processes.
"""
import importlib
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
import kernels
import optim as optim_lib
from configurator import ConfigError, configure
from data import DataError, Prefetcher
from model import EncoderDecoder, Qwen3
from model_config import ModelConfig, get_preset
from tokenizer import IGNORE_INDEX, NUM_SENTINELS
from vocab_trim import VocabTrim, used_ids

# objective name -> module (a file with `Objective` and `CONFIG`): a new objective is a file and a line here
OBJECTIVES = {"ul2": "ul2", "causal": "causal", "contrastive": "contrastive", "diffusion": "diffusion"}

_names_before_config = set(globals())
# ---- run, checkpoints, logging
out_dir = "out"
init_from = "scratch"           # 'scratch' (model_preset), 'qwen3' (qwen3_path), 'resume' (latest checkpoint in out_dir),
                                # 'pretrained' (init_path, a directory the objective reads: e.g. a UL2 run for contrastive)
objective = "ul2"               # a key of OBJECTIVES: 'ul2' (encoder-decoder), 'causal' (decoder-only Qwen3), ...
model_preset = "tiny_encdec"    # a model_config.py preset, for init_from='scratch'
model_overrides = {}            # ModelConfig fields replacing the preset's, e.g. {'hidden_size': 128}
qwen3_path = ""                 # Hugging Face Qwen3 directory or hub name, for init_from='qwen3'
init_path = ""                  # for init_from='pretrained'
max_iters = 1000
log_interval = 10
eval_interval = 250             # 0: never evaluate
eval_iters = 20                 # batches of batch_size per evaluation (split over the processes)
ckpt_interval = 1000            # 0: only at the end
keep_last = 3                   # checkpoints kept in out_dir
max_bad_steps = 5               # non-finite losses in a row before the run stops
wandb_log = False
wandb_project = "qwen3-encdec"
wandb_run_name = ""
# ---- data
data_dir = "data/shakespeare_qwen3"
batch_size = 8                  # rows per micro-step in each process
grad_accum = 1                  # micro-steps per iteration over all processes: global batch = batch_size * grad_accum rows
enc_len = 512                   # encoder positions per row
dec_len = 512                   # decoder positions per row
pack = True                     # several examples per row (segment ids), so nearly every position is a real token
trim_vocab = False              # train only the embedding rows the shards use (vocab_trim.py); checkpoints stay full
prefetch = 4                    # micro-batches built ahead by the background thread
seed = 1337
# ---- optimiser
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 100
lr_decay_iters = 0              # end of the cosine; 0: max_iters
weight_decay = 0.1              # on matrices only: not on norms, not on the (tied) embedding
beta1 = 0.9
beta2 = 0.95
optimizer = "adamw"              # 'adamw', 'adamw8bit', 'lion8bit', 'lion' (optim.py; 8-bit via bitsandbytes)
grad_clip = 1.0                 # 0: no clipping (the norm is still logged)
# ---- system
device = "auto"                 # 'auto' (CUDA when present), 'cpu', 'cuda'
dtype = "auto"                  # 'auto' (bfloat16 on CUDA, float32 on CPU), 'float32', 'bfloat16' (autocast)
parallelism = "ddp"             # under torchrun: 'ddp', 'zero1' (ZeroRedundancyOptimizer) or 'fsdp' (FSDP2)
compile = False                 # torch.compile each block
activation_checkpointing = False
use_triton = True               # fused Triton kernels where tensors are on CUDA (kernels.py)
DEFAULTS = {k: v for k, v in globals().items() if k not in _names_before_config and not k.startswith("_")}
for _module in OBJECTIVES.values():  # each objective's own keys (ul2_mixture, ...)
    DEFAULTS.update(importlib.import_module(_module).CONFIG)

# dense bf16 peak FLOP/s for MFU; the first name found in torch.cuda.get_device_name() wins
GPU_PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("B200", 2250e12),
                  ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
                  ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12)]


class Fail(Exception):
    """Stops the run with a one-line message (train.py: error: ...)."""


# ---------------------------------------------------------------------------------------
# config checks and model shape, all before anything heavy

def check_config(c, world):
    choices = {"init_from": ("scratch", "qwen3", "resume", "pretrained"), "parallelism": ("ddp", "zero1", "fsdp"),
               "objective": tuple(OBJECTIVES),
               "device": ("auto", "cpu", "cuda"), "dtype": ("auto", "float32", "bfloat16"),
               "optimizer": optim_lib.OPTIMIZERS}
    for key, ok in choices.items():
        if getattr(c, key) not in ok:
            raise Fail(f"config key '{key}' is {getattr(c, key)!r}; choose one of {', '.join(ok)}")
    for key in ("max_iters", "eval_iters", "prefetch", "warmup_iters", "lr_decay_iters", "ckpt_interval",
                "eval_interval"):
        if getattr(c, key) < 0:
            raise Fail(f"config key '{key}' must be >= 0, got {getattr(c, key)}")
    for key in ("batch_size", "grad_accum", "log_interval", "keep_last", "max_bad_steps", "enc_len", "dec_len"):
        if getattr(c, key) < 1:
            raise Fail(f"config key '{key}' must be >= 1, got {getattr(c, key)}")
    if c.grad_accum % world:
        raise Fail(f"grad_accum={c.grad_accum} must be a multiple of the number of processes ({world})")
    if c.init_from == "qwen3" and not c.qwen3_path:
        raise Fail("init_from='qwen3' needs --qwen3_path=DIR (a Hugging Face Qwen3 checkpoint directory or hub name)")
    if c.init_from == "pretrained" and not os.path.isdir(c.init_path):
        raise Fail(f"init_from='pretrained' needs --init_path=DIR, an existing directory (got {c.init_path!r})")


def find_qwen3(path):
    """A local Hugging Face directory, or a hub name fetched into the local cache."""
    if not os.path.isdir(path):
        if path.startswith((".", "/", "~")) or path.count("/") != 1:
            raise Fail(f"qwen3_path {path} is not a directory; pass a Hugging Face Qwen3 checkpoint directory")
        try:
            from huggingface_hub import snapshot_download
            path = snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])
        except Exception as e:
            raise Fail(f"qwen3_path {path}: not a local directory and not fetched from the hub "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                       "download it first and pass the directory") from None
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise Fail(f"qwen3_path {path} has no config.json; pass a Hugging Face Qwen3 checkpoint directory")
    return path


list_checkpoints = checkpoint.list_checkpoints  # the one rule (checkpoint.py); kept for scripts and tests


def model_shape(c, Objective):
    """(ModelConfig, Qwen3 directory or checkpoint directory) without loading any weights."""
    decoder_only = Objective.model_type == "decoder"
    if c.init_from == "pretrained":
        if not hasattr(Objective, "init_config"):
            raise Fail(f"objective '{c.objective}' reads no pretrained directory; use init_from='qwen3' or 'resume'")
        mcfg, source = Objective.init_config(c.init_path), c.init_path
        mcfg = ModelConfig.from_dict({**mcfg.to_dict(), **c.model_overrides})
    elif c.init_from == "scratch":
        mcfg, source = get_preset(c.model_preset, **c.model_overrides), None
    elif c.init_from == "qwen3":
        source = find_qwen3(c.qwen3_path)
        mcfg = ModelConfig.from_hf(source)
        if not decoder_only:
            mcfg = ModelConfig.from_dict({**mcfg.to_dict(), "vocab_size": mcfg.vocab_size + NUM_SENTINELS,
                                          "num_encoder_layers": mcfg.num_layers, "tie_embeddings": True,
                                          **c.model_overrides})
    else:
        try:  # the newest complete checkpoint; a damaged newer one is skipped with one line
            source = checkpoint.newest(c.out_dir, log=print if int(os.environ.get("RANK", 0)) == 0 else lambda m: 0)
        except checkpoint.CheckpointError as e:
            raise Fail(f"init_from='resume': {e}; delete that checkpoint to resume from the one before") from None
        if source is None:
            raise Fail(f"init_from='resume': no checkpoint ckpt-NNNNNNN in {c.out_dir}; "
                       "start with init_from='scratch' or 'qwen3', or point --out_dir at an earlier run")
        with open(os.path.join(source, "config.json")) as f:
            d = json.load(f)
        mcfg = ModelConfig.from_hf(d) if d.get("model_type") == "qwen3" else ModelConfig.from_dict(d)
    if mcfg.is_encoder_decoder == decoder_only:
        raise Fail(f"objective='{c.objective}' trains {'a decoder-only' if decoder_only else 'an encoder-decoder'} "
                   f"model, but the model is {'an encoder-decoder' if decoder_only else 'decoder-only'}; pick a "
                   f"matching model_preset (e.g. {'tiny' if decoder_only else 'tiny_encdec'}) or objective")
    return mcfg, source


def blocks(raw):
    return [*(raw.encoder.layers if isinstance(raw, EncoderDecoder) else []), *raw.decoder.layers]


def load_model(c, mcfg, source, model_type):
    cls = Qwen3 if model_type == "decoder" else EncoderDecoder
    if c.init_from == "scratch":
        return cls(mcfg)
    if c.init_from == "qwen3" and cls is EncoderDecoder:
        model = EncoderDecoder.from_qwen3(source)
        model.cfg = mcfg  # model_overrides such as enc_rope change no weights
        return model
    return cls.from_pretrained(source)  # a Hugging Face Qwen3 dir, or one of our checkpoints


def check_out_dir(c):
    if c.init_from != "resume" and list_checkpoints(c.out_dir):
        raise Fail(f"out_dir {c.out_dir} already holds checkpoints from an earlier run; continue it with "
                   "--init_from=resume, or pick a new --out_dir (or delete the old one)")


def remap(batch, trim, id_keys):
    """Full ids -> the trimmed vocabulary's ids (a no-op without trimming)."""
    if trim is None:
        return batch
    return {k: trim.to_compact(v) if k in id_keys else v for k, v in batch.items()}


def to_tensors(batch, pin):
    out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
    return {k: v.pin_memory() for k, v in out.items()} if pin else out


# ---------------------------------------------------------------------------------------
# model, parallelism, optimiser

def parallelize(model, c, world, dev, ptdtype):
    if world == 1:
        return model
    if c.parallelism == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # fp32 shards and gradients; the matmuls run under the same autocast as DDP's, so the residual stream
        # (fp32) and every result match the other parallelisms (a bf16 param_dtype would make it bf16)
        mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for block in blocks(model):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)  # the root holds the tied embedding and the final norms
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def get_lr(it, c):
    decay_iters = c.lr_decay_iters or c.max_iters
    if it < c.warmup_iters:
        return c.learning_rate * (it + 1) / (c.warmup_iters + 1)
    if it >= decay_iters:
        return c.min_lr
    t = (it - c.warmup_iters) / max(decay_iters - c.warmup_iters, 1)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * t)) * (c.learning_rate - c.min_lr)


# ---------------------------------------------------------------------------------------
# checkpoints (checkpoint.py): full under one process / DDP, sharded (torch.distributed.checkpoint) under FSDP / ZeRO-1

def _sharded(c, world):
    return world > 1 and c.parallelism == "fsdp"


def read_checkpoint(path):
    """(trainer_state.json, optimizer tensors, RNG tensors) of a full checkpoint, for inspection."""
    from safetensors.torch import load_file
    checkpoint.check(path)
    tensors = load_file(os.path.join(path, "trainer_state.safetensors"))
    return (checkpoint.read_trainer_state(path), {k: v for k, v in tensors.items() if k.startswith("optim.")},
            {k: v for k, v in tensors.items() if k.startswith("rng.")})


def schedule_change(saved, c, it):
    """One line saying how the learning-rate schedule moves when a resumed run changes it."""
    keys = ("max_iters", "lr_decay_iters", "warmup_iters", "learning_rate", "min_lr")
    old = SimpleNamespace(**{k: saved.get(k, getattr(c, k)) for k in keys})
    if all(getattr(old, k) == getattr(c, k) for k in keys):
        return None
    changed = ", ".join(f"{k} {getattr(old, k)} -> {getattr(c, k)}" for k in keys if getattr(old, k) != getattr(c, k))
    end, old_end = c.lr_decay_iters or c.max_iters, old.lr_decay_iters or old.max_iters
    same = all(get_lr(i, old) == get_lr(i, c) for i in range(it, max(end, old_end) + 1))
    if same:
        return f"resuming at iter {it} with {changed}: the learning-rate schedule is unchanged (the cosine ends at {end})"
    return (f"resuming at iter {it} with {changed}: the cosine now ends at iter {end} (was {old_end}); "
            f"lr at iter {it} {get_lr(it, old):.3e} -> {get_lr(it, c):.3e}")


# ---------------------------------------------------------------------------------------
# evaluation: token-weighted loss per group (per denoiser for UL2) on fixed validation batches

def eval_batches(c, obj, world, rank, trim):
    """This process's share of the fixed validation set: per batch, one sub-batch per group. Every
    process runs the same number of forwards (a sub-batch with no rows of a group becomes a dummy
    whose labels are all ignored) so FSDP's collectives stay in step."""
    rounds = []
    for i in range(rank, math.ceil(c.eval_iters / world) * world, world):
        b = obj.eval_batch(i % max(c.eval_iters, 1), c.batch_size)
        if b is None:
            return []
        b = remap(b, trim, obj.id_keys)
        subs = []
        for g in range(len(obj.groups)):
            rows = b["group"] == g
            if i >= c.eval_iters or not rows.any():
                sub = {k: v[:1] for k, v in b.items()}
                sub["labels"] = np.full_like(sub["labels"], IGNORE_INDEX)
            else:
                sub = {k: v[rows] for k, v in b.items()}
            subs.append(to_tensors(sub, pin=False))
        rounds.append(subs)
    return rounds


@torch.no_grad()
def evaluate(model, obj, rounds, dev, autocast, world):
    model.eval()
    sums = torch.zeros(2, len(obj.groups), dtype=torch.float64, device=dev)  # summed loss, count
    for subs in rounds:
        for g, sub in enumerate(subs):
            with autocast:
                loss_sum, count = obj.loss(model, {k: v.to(dev) for k, v in sub.items()})
            sums[0, g] += loss_sum.double()
            sums[1, g] += count
    if world > 1:
        dist.all_reduce(sums)
    model.train()
    per = {f"val/{name}": (s / n).item() for name, s, n in zip(obj.groups, sums[0], sums[1]) if n > 0}
    return {"val_loss": (sums[0].sum() / sums[1].sum().clamp(min=1)).item(), **per}


# ---------------------------------------------------------------------------------------

def main(argv):
    world, rank, local_rank = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    try:
        c = SimpleNamespace(**configure(DEFAULTS, argv))
    except ConfigError as e:
        raise Fail(str(e)) from None
    check_config(c, world)
    use_cuda = c.device == "cuda" or (c.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise Fail("device='cuda' but torch sees no CUDA device; use --device=cpu")
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    dtype_name = c.dtype if c.dtype != "auto" else ("bfloat16" if use_cuda else "float32")
    ptdtype = getattr(torch, dtype_name)
    kernels.use_triton(c.use_triton)

    # everything that can fail on bad input fails here, before any weights load
    Objective = importlib.import_module(OBJECTIVES[c.objective]).Objective
    try:
        check_out_dir(c)
        mcfg, source = model_shape(c, Objective)
        obj = Objective(c, mcfg, rank, world)
    except (ValueError, OSError) as e:  # messages from model_config / objectives / shards name the file or key
        raise Fail(str(e)) from None
    trim = None
    if c.trim_vocab:  # the ids the shards hold, and those the objective writes (all of them, for text objectives)
        shard_sets = getattr(obj, "shard_sets", [])
        if not shard_sets and not len(getattr(obj, "extra_ids", ())):
            raise Fail(f"trim_vocab=True: objective '{c.objective}' names no token ids to keep; drop trim_vocab")
        trim = VocabTrim(used_ids(shard_sets, mcfg.vocab_size, obj.extra_ids), mcfg.vocab_size)

    if world > 1:
        if use_cuda:
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    torch.manual_seed(c.seed)  # identical initial weights in every process
    run = {"iter": 0, "examples": 0, "bad_steps": 0, "val_loss": None}
    # resume: an empty model on the meta device, filled from the checkpoint once placed (under FSDP each
    # process allocates and reads only its shards); trimming needs real rows to cut, so it builds on CPU
    meta = c.init_from == "resume" and trim is None
    try:
        if c.init_from == "resume":
            with torch.device("meta") if meta else nullcontext():
                raw = (Qwen3 if Objective.model_type == "decoder" else EncoderDecoder)(mcfg)
        else:
            raw = obj.load_init(source) if c.init_from in ("qwen3", "pretrained") and hasattr(obj, "load_init") else None
            raw = raw or load_model(c, mcfg, source, Objective.model_type)
    except (ValueError, OSError) as e:
        raise Fail(f"cannot load {source}: {e}") from None
    if trim is not None:
        trim.shrink(raw)

    def place(m):
        return m.to_empty(device=dev) if meta else m.to(dev)
    if not _sharded(c, world):
        place(raw)
    raw.set_activation_checkpointing(c.activation_checkpointing)
    if c.compile:
        for block in blocks(raw):
            block.compile()  # in place: parameter names, and so checkpoints, stay the same
    model = parallelize(raw, c, world, dev, ptdtype)
    if _sharded(c, world):
        place(raw)  # after sharding: only this process's shards reach the device
    # an objective's own trained parameters (a learnable temperature), optimised and checkpointed with the model
    extra = list(obj.parameters()) if hasattr(obj, "parameters") else []
    for _, p in extra:
        p.data = p.data.to(dev)
    opt = optim_lib.make_optimizer(raw, c, world, extra, log=optim_lib.warn if rank == 0 else lambda m: None)
    if c.init_from == "resume":
        try:  # weights, optimizer state and this process's RNG; each process reads what it holds
            saved = checkpoint.load(source, raw, opt, world, rank, trim)
        except (ValueError, OSError, KeyError) as e:
            raise Fail(f"cannot resume from {source}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
                from None
        run.update({k: saved[k] for k in run})
        for name, p in extra:
            p.data.copy_(torch.tensor(saved["objective_params"][name], dtype=p.dtype))
        note = schedule_change(saved.get("config", {}), c, run["iter"])
        if note and rank == 0:
            print(note)
    # one rule for every parallelism: fp32 weights, matmuls in the autocast dtype (so FSDP and DDP compute alike)
    autocast = torch.autocast(dev.type, dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()

    micro_steps = c.grad_accum // world
    global_batch = c.batch_size * c.grad_accum
    iter0, examples0 = run["iter"], run["examples"]
    real = getattr(obj, "real_tokens", None)

    def make(it, a):
        g = rank * micro_steps + a  # this micro-batch's index within the global batch
        first = examples0 + (it - iter0) * global_batch + g * c.batch_size
        batch = obj.train_batch(it, first, c.batch_size)
        tokens = real(batch) if real else (0, 0, 0)
        return to_tensors(remap(batch, trim, obj.id_keys), pin=use_cuda), tokens

    rounds = eval_batches(c, obj, world, rank, trim) if c.eval_interval else []
    peak = next((f for n, f in GPU_PEAK_FLOPS if n in torch.cuda.get_device_name(dev)), None) if use_cuda else None

    log_file, wandb = None, None
    if rank == 0:
        os.makedirs(c.out_dir, exist_ok=True)
        log_file = open(os.path.join(c.out_dir, "log.jsonl"), "a" if c.init_from == "resume" else "w")
        if c.wandb_log:
            try:
                import wandb
                wandb.init(project=c.wandb_project, name=c.wandb_run_name or None, config=vars(c))
            except ImportError:
                print("warning: wandb_log=True but wandb is not installed; logging to log.jsonl only")
        n = mcfg.num_params()
        print(f"model {n['total'] / 1e6:.1f}M params ({n['non_embedding'] / 1e6:.1f}M non-embedding), objective "
              f"{c.objective}, {world} process(es){' ' + c.parallelism if world > 1 else ''} on {dev} {dtype_name}, "
              f"global batch {global_batch} rows x (enc {c.enc_len if mcfg.is_encoder_decoder else 0} + dec "
              f"{c.dec_len}){' packed' if c.pack else ''}, from iter {iter0}"
              + (f", vocabulary trimmed to {len(trim):,} rows" if trim is not None else ""))

    def log(record, line):
        if rank == 0:
            print(line, flush=True)
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            if wandb is not None:
                wandb.log(record, step=record["iter"])

    # SIGTERM / SIGUSR1 (preemption, a scheduler's warning): checkpoint at the next step and exit 0. The
    # handler only sets a flag; the processes agree on it through the step's all_reduce
    signalled = []
    handlers = {s: signal.signal(s, lambda num, frame: signalled.append(signal.Signals(num).name))
                for s in (signal.SIGTERM, signal.SIGUSR1)}
    sharded_ckpt = world > 1 and c.parallelism in ("fsdp", "zero1")
    prefetcher = Prefetcher(make, iter0, micro_steps, c.prefetch)
    t_start = t_log = time.time()
    iters_logged, tokens_logged, flops_logged = 0, 0, 0.0
    stopping, last_ckpt = False, None
    try:
        for it in range(iter0, c.max_iters + 1):
            if c.eval_interval and (it % c.eval_interval == 0 or it == c.max_iters) and rounds and not stopping:
                ev = evaluate(model, obj, rounds, dev, autocast, world)
                run["val_loss"] = ev["val_loss"]
                log({"iter": it, **ev}, f"iter {it}: val loss {ev['val_loss']:.4f} (" +
                    ", ".join(f"{k[4:]} {v:.3f}" for k, v in ev.items() if k.startswith("val/")) + ")")
            if it > iter0 and (stopping or (c.ckpt_interval and it % c.ckpt_interval == 0) or it == c.max_iters):
                state = {**run, "parallelism": c.parallelism, "config": vars(c),
                         "objective_params": {n: p.detach().cpu().tolist() for n, p in extra}}
                last_ckpt = checkpoint.save(c.out_dir, it, raw, opt, state, world, rank, sharded_ckpt, trim, c.keep_last)
                if rank == 0:
                    print(f"iter {it}: checkpoint {last_ckpt}{' (sharded)' if sharded_ckpt else ''}", flush=True)
            if it == c.max_iters or stopping:
                break

            # one optimisation step over grad_accum micro-batches, split between the processes:
            # summed losses backward, then the gradients divided once by the global count
            lr = get_lr(it, c)
            for group in opt.param_groups:
                group["lr"] = lr
            totals = torch.zeros(6, dtype=torch.float64, device=dev)  # loss sum, count, enc/dec tokens, examples, signal
            for a in range(micro_steps):
                batch, tokens = prefetcher.next()
                batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
                last = a == micro_steps - 1
                if _sharded(c, world):
                    model.set_requires_gradient_sync(last)
                sync = model.no_sync() if world > 1 and not last and not _sharded(c, world) else nullcontext()
                with sync, autocast:
                    loss_sum, count = obj.loss(model, batch)
                    loss_sum.backward()
                totals[2:5] += torch.tensor(tokens, dtype=torch.float64, device=dev)
                totals[0] += loss_sum.detach().double()
                totals[1] += count
            totals[5] = float(bool(signalled))
            if world > 1:
                dist.all_reduce(totals)
            stopping = totals[5].item() > 0
            loss_value = (totals[0] / totals[1].clamp(min=1)).item()
            # DDP and FSDP average gradients over processes: undo that, then divide by the global count
            scale = world / max(totals[1].item(), 1.0)
            params = [*model.parameters(), *(p for _, p in extra)]
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
            norm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip or float("inf"))
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            if math.isfinite(loss_value) and math.isfinite(norm):
                opt.step()
                run["bad_steps"] = 0
            else:
                run["bad_steps"] += 1
                if rank == 0:
                    print(f"warning: iter {it}: non-finite loss {loss_value} / grad norm {norm}; step skipped")
                if run["bad_steps"] >= c.max_bad_steps:
                    last_ckpt = (list_checkpoints(c.out_dir) or ["none"])[-1]
                    raise Fail(f"{run['bad_steps']} non-finite losses in a row at iter {it}; stopped. Last good "
                               f"checkpoint: {last_ckpt}. Lower learning_rate or check the data")
            opt.zero_grad(set_to_none=True)
            run["iter"], run["examples"] = it + 1, run["examples"] + global_batch

            enc_t, dec_t, examples = totals[2:5].tolist()
            iters_logged += 1
            tokens_logged += enc_t + dec_t
            flops_logged += examples and examples * mcfg.flops_per_example(enc_t / examples, dec_t / examples)
            if (it + 1) % c.log_interval == 0 or it + 1 == c.max_iters:
                now = time.time()
                dt = (now - t_log) / iters_logged
                tok_s = tokens_logged / (now - t_log)  # real tokens only: padding is not counted
                mfu = flops_logged / (now - t_log) / (peak * world) if peak else None
                eta = (c.max_iters - it - 1) * (now - t_start) / (it + 1 - iter0)
                log({"iter": it + 1, "loss": loss_value, "lr": lr, "grad_norm": norm, "tok_per_s": tok_s,
                     "mfu": mfu, "dt": dt, "time": now - t_start},
                    f"iter {it + 1}/{c.max_iters}: loss {loss_value:.4f}, lr {lr:.2e}, grad norm {norm:.3f}, "
                    f"{tok_s:,.0f} tok/s, mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}, "
                    f"{1000 * dt:.0f} ms/iter, eta {time.strftime('%H:%M:%S', time.gmtime(eta))}")
                t_log, iters_logged, tokens_logged, flops_logged = now, 0, 0, 0.0
        if stopping and rank == 0:
            print(f"stopped by {signalled[0] if signalled else 'a signal to another process'} at iter {run['iter']}; "
                  f"continue with --init_from=resume", flush=True)
        elif sharded_ckpt and last_ckpt and rank == 0:  # the last checkpoint, whole, for sample / extract / eval
            checkpoint.consolidate(last_ckpt, log=print)
        if sharded_ckpt and last_ckpt:
            dist.barrier()
        if rank == 0 and not stopping:
            val = f", val loss {run['val_loss']:.4f}" if run["val_loss"] is not None else ""
            print(f"done: {run['iter'] - iter0} iterations in {time.strftime('%H:%M:%S', time.gmtime(time.time() - t_start))}"
                  f"{val}; last checkpoint {last_ckpt or 'none'} (sample.py / extract.py / eval_embed.py read it)",
                  flush=True)
    finally:
        prefetcher.close()
        for s, h in handlers.items():
            signal.signal(s, h)
        if log_file is not None:
            log_file.close()
    return run


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (Fail, DataError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
