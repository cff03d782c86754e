"""Checkpoint I/O: one atomic write, one rule for the newest complete checkpoint, full and sharded state.

    python checkpoint.py consolidate out/ckpt-0005000     # sharded -> model.safetensors + config.json
    python checkpoint.py check out                        # which checkpoints are complete, and why not

A training out_dir holds ckpt-NNNNNNN directories (NNNNNNN = iterations done). Two layouts:

  full     model.safetensors + config.json (what sample.py / extract.py / eval read; Hugging Face files for
           a decoder-only Qwen3), trainer_state.safetensors (optimizer state by parameter name 'optim.NAME.KEY',
           every process's RNG 'rng.torch.R'), trainer_state.json (iteration, examples, config, ...).
           Written by one process or DDP (rank 0; the state is the same everywhere).
  sharded  shards/ (torch.distributed.checkpoint: every process writes its own shards of the weights
           'model.NAME', of its optimizer state 'optim.NAME.KEY' and its RNG; no process gathers the
           whole model), config.json, trainer_state.json. Written under FSDP and ZeRO-1. `consolidate`
           adds model.safetensors (train.py does it for the last checkpoint of a run).

Either layout resumes under any process count and parallelism: a process reads only the shards it
needs (DCP, or safetensors slices).

Completeness: every file is written under ckpt-NNNNNNN.tmp, fsync'd, and the directory is renamed
to its final name last, so a final name means "was complete". `check` also verifies every file's
length against its own header (a copy cut short, a full disk), and `newest` walks back from the
newest checkpoint past damaged ones, saying which file it skipped.
"""
import json
import os
import re
import shutil
import struct
import sys
import warnings
from types import SimpleNamespace

import torch
import torch.distributed as dist

import optim as optim_lib

CKPT_NAME = re.compile(r"ckpt-(\d{7})")
SHARDS = "shards"


class CheckpointError(ValueError):
    """One line naming the checkpoint file that is missing or damaged."""


# ---------------------------------------------------------------------------------------
# the atomic write

def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def publish(tmp, path):
    """fsync `tmp` (a file, or a directory tree) and rename it to `path`: readers see the old
    `path` or the complete new one, never a part. An old directory is moved aside first (a
    directory cannot be replaced by rename), under a .tmp name no reader takes."""
    if os.path.isdir(tmp):
        for root, _, files in os.walk(tmp):
            for f in files:
                fsync(os.path.join(root, f))
            fsync(root)
    else:
        fsync(tmp)
    if os.path.isdir(path):
        old = path + ".old.tmp"
        _remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)
    fsync(os.path.dirname(os.path.abspath(path)))


def write_atomic(path, write):
    """The one way files are written: `write(tmp)` fills a temporary file or directory next to
    `path` (same filesystem), then publish() makes it appear whole under `path`."""
    tmp = f"{path}.tmp"
    _remove(tmp)  # a leftover of a write that was killed
    write(tmp)
    publish(tmp, path)


def write_json(path, obj):
    def dump(p):
        with open(p, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
    write_atomic(path, dump)


def write_safetensors(path, tensors, metadata=None):
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomic(path, lambda p: save_file(tensors, p, metadata={"format": "pt", **(metadata or {})}))


# ---------------------------------------------------------------------------------------
# the rule: which checkpoints exist, which are complete, the newest complete one

def ckpt_path(out_dir, it):
    return os.path.join(out_dir, f"ckpt-{it:07d}")


def list_checkpoints(out_dir):
    """ckpt-NNNNNNN directories of a training out_dir, oldest first. A name with any suffix
    (.tmp, .old.tmp) is a write in progress or a leftover and never counts."""
    if not os.path.isdir(out_dir):
        return []
    found = [n for n in os.listdir(out_dir) if CKPT_NAME.fullmatch(n) and os.path.isdir(os.path.join(out_dir, n))]
    return [os.path.join(out_dir, n) for n in sorted(found)]


def check_safetensors(path):
    """The file is as long as its header says (8-byte header length, JSON header, data)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes, header says "
                                  f"{n} header bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise CheckpointError(f"{path} has a damaged header (not a safetensors file?)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise CheckpointError(f"{path} is truncated: {size} bytes, its header needs {8 + n + end}")


def _check_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path} is damaged ({e})") from None


def _check_shards(path):
    from torch.distributed.checkpoint import FileSystemReader
    try:
        meta = FileSystemReader(path).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{path}/.metadata is unreadable ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    need = {}
    for info in (meta.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, length in need.items():
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            raise CheckpointError(f"{f} is missing")
        if os.path.getsize(f) < length:
            raise CheckpointError(f"{f} is truncated: {os.path.getsize(f)} bytes, needs {length}")
    return meta


def check(path, weights=False):
    """'full', 'sharded' or 'weights' (a model directory without trainer state) if every file of the
    checkpoint is there and whole; else CheckpointError naming the file. weights=True: the caller
    needs model.safetensors (sample, extract, eval), so a sharded checkpoint must be consolidated."""
    def need(name):
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            raise CheckpointError(f"{f} is missing")
        return f
    _check_json(need("config.json"))
    sharded = os.path.isdir(os.path.join(path, SHARDS))
    has_weights = os.path.isfile(os.path.join(path, "model.safetensors")) or \
        os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        check_safetensors(need("model.safetensors"))
    elif os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        index = _check_json(need("model.safetensors.index.json"))
        for name in sorted(set(index.get("weight_map", {}).values())):
            check_safetensors(need(name))
    if weights and not has_weights:
        raise CheckpointError(f"{path} is sharded and has no model.safetensors yet; run "
                              f"python checkpoint.py consolidate {path}" if sharded else
                              f"{path}/model.safetensors is missing")
    trainer = os.path.isfile(os.path.join(path, "trainer_state.json"))
    if trainer:
        _check_json(need("trainer_state.json"))
    if sharded:
        _check_shards(os.path.join(path, SHARDS))
        return "sharded"
    if trainer:
        check_safetensors(need("trainer_state.safetensors"))
        if not has_weights:
            need("model.safetensors")
        return "full"
    if not has_weights:
        need("model.safetensors")
    return "weights"


def newest(out_dir, weights=False, log=None):
    """The newest complete checkpoint of out_dir (None if it has none). A damaged one is skipped
    with one line through `log` (naming the file); if every one is damaged, the newest one's error."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    ckpts = list_checkpoints(out_dir)
    first = None
    for path in reversed(ckpts):
        try:
            check(path, weights)
            if first is not None:
                log(f"note: {first}; using {path} instead")
            return path
        except CheckpointError as e:
            first = first or e
    if first is not None:
        raise first
    return None


def resolve(path, weights=True, log=None):
    """A checkpoint directory as is (checked); a training out_dir -> its newest complete checkpoint.
    For sample.py / extract.py / eval_embed.py (weights=True) and train.py's resume (weights=False)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory")
    if os.path.isfile(os.path.join(path, "config.json")):
        check(path, weights)
        return path
    found = newest(path, weights, log)
    if found is None:
        raise CheckpointError(f"{path}: no config.json and no complete ckpt-NNNNNNN inside; pass a checkpoint "
                              "directory or a training out_dir")
    return found


# ---------------------------------------------------------------------------------------
# helpers shared by save and load

def _is_dtensor(t):
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def local_part(full, like):
    """The part of a full tensor that `like` (a DTensor shard, or a plain tensor) holds here; no
    communication."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None).to_local()


def copy_into(target, full):
    with torch.no_grad():
        if _is_dtensor(target):
            target.to_local().copy_(local_part(full, target))
        else:
            target.copy_(full)


def config_json(raw):
    """What the model's save_pretrained writes as config.json, without touching its weights."""
    import tempfile
    probe = SimpleNamespace(cfg=raw.cfg, embed=SimpleNamespace(weight=SimpleNamespace(dtype=torch.float32)),
                            state_dict=dict)
    with tempfile.TemporaryDirectory() as d:
        type(raw).save_pretrained(probe, d)  # an empty model.safetensors and the real config.json
        with open(os.path.join(d, "config.json")) as f:
            return json.load(f)


def model_class(config):
    from model import EncoderDecoder, Qwen3
    return Qwen3 if config.get("model_type") == "qwen3" else EncoderDecoder


def _save_weights(raw_cls, cfg, state, out_dir):
    """model.safetensors + config.json through the model's own save_pretrained (a meta shell holds
    the given tensors)."""
    with torch.device("meta"):
        shell = raw_cls(cfg)
    shell.load_state_dict(state, assign=True)
    shell.save_pretrained(out_dir)


def rng_states(world):
    """Every process's torch (and CUDA) generator state: {'rng.KIND.RANK': uint8 tensor}."""
    mine = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mine["cuda"] = torch.cuda.get_rng_state()
    everyone = [mine]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
    return {f"rng.{k}.{r}": v for r, states in enumerate(everyone) for k, v in states.items()}


def _set_rng(get, keys, rank):
    """get(key) -> tensor; this process's generators from its own state (or process 0's when the
    run had fewer processes)."""
    for kind in ("torch", "cuda"):
        key = f"rng.{kind}.{rank}" if f"rng.{kind}.{rank}" in keys else f"rng.{kind}.0"
        if key not in keys:
            continue
        if kind == "torch":
            torch.set_rng_state(get(key))
        elif torch.cuda.is_available():
            torch.cuda.set_rng_state(get(key))


def _barrier(world):
    if world > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------
# save

def save(out_dir, it, raw, opt, trainer_state, world=1, rank=0, sharded=False, trim=None, keep_last=0):
    """Checkpoint ckpt-{it} of out_dir; every process calls it. raw: the unwrapped model (its
    parameters are DTensors under FSDP); trainer_state: JSON-able run state (iteration, config...).
    Returns the checkpoint path."""
    final = ckpt_path(out_dir, it)
    tmp = final + ".tmp"
    state = {**trainer_state, "world_size": world, "sharded": sharded,
             "optimizer_class": getattr(opt, "chosen", type(optim_lib.local(opt)).__name__)}
    if rank == 0:
        for name in os.listdir(out_dir):  # leftovers of writes that were killed
            if name.startswith("ckpt-") and name.endswith(".tmp"):
                _remove(os.path.join(out_dir, name))
    if sharded:
        import torch.distributed.checkpoint as dcp
        _barrier(world)
        sd = {f"model.{k}": v for k, v in raw.state_dict().items()}
        sd.update({f"optim.{k}": v for k, v in optim_lib.state_tensors(opt, raw).items()})
        sd[f"rng.torch.{rank}"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            sd[f"rng.cuda.{rank}"] = torch.cuda.get_rng_state()
        if trim is not None:  # the compact embedding is saved; consolidation scatters it back
            sd["trim.kept"], sd["trim.full_embed"] = trim.kept, trim.full_embed
        dcp.save(sd, checkpoint_id=os.path.join(tmp, SHARDS))  # collective; every process writes its own file
        if rank == 0:
            config = config_json(raw)
            for name, obj in (("config.json", config), ("trainer_state.json", state)):
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(obj, f, indent=1)
            publish(tmp, final)
    else:
        from safetensors.torch import save_file
        model_sd = raw.state_dict()
        if trim is not None:
            model_sd = trim.expand_state(model_sd)
        tensors, seen = {}, set()
        for k, v in optim_lib.state_tensors(opt, raw).items():
            v = v.detach().cpu().contiguous()
            if v.untyped_storage().data_ptr() in seen:  # shared between parameters (bitsandbytes' qmap)
                v = v.clone()
            seen.add(v.untyped_storage().data_ptr())
            tensors[f"optim.{k}"] = v
        tensors.update(rng_states(world))
        if rank == 0:
            def fill(d):
                _save_weights(type(raw), raw.cfg, model_sd, d)
                save_file(tensors, os.path.join(d, "trainer_state.safetensors"))
                with open(os.path.join(d, "trainer_state.json"), "w") as f:
                    json.dump(state, f, indent=1)
            write_atomic(final, fill)
    if rank == 0 and keep_last:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            os.replace(old, old + ".old.tmp")  # out of the rule's sight first, then gone
            _remove(old + ".old.tmp")
    _barrier(world)
    return final


# ---------------------------------------------------------------------------------------
# load

def read_trainer_state(path):
    """trainer_state.json of a checkpoint (CheckpointError naming the file if it is damaged)."""
    f = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(f):
        raise CheckpointError(f"{f} is missing (not a training checkpoint?)")
    return _check_json(f)


def load(path, raw, opt, world=1, rank=0, trim=None):
    """Fill the model's weights (already built and parallelised; parameters may be DTensor shards,
    on any device, but not meta), the optimizer state and this process's RNG from checkpoint
    `path` of either layout; returns its trainer_state.json. Each process reads only what it holds.
    With trim, the model is the trimmed one (trim built from the same shards as the saved run)."""
    kind = check(path)
    state = read_trainer_state(path)
    chosen = getattr(opt, "chosen", None)
    if chosen and state.get("optimizer_class") and state["optimizer_class"] != chosen:
        raise CheckpointError(f"{path}/trainer_state.json: written with optimizer {state['optimizer_class']}, this "
                              f"run has {chosen}; resume with the same --optimizer (and the same bitsandbytes/"
                              "torchao install)")
    optim_lib.init_state(opt, raw)
    if kind == "sharded":
        _load_sharded(os.path.join(path, SHARDS), raw, opt, rank, trim)
    else:
        _load_full(path, raw, opt, rank, trim)
    return state


def _load_sharded(shards, raw, opt, rank, trim):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    meta = FileSystemReader(shards).read_metadata().state_dict_metadata
    model_sd = raw.state_dict()
    missing = [k for k in model_sd if f"model.{k}" not in meta]
    if missing:
        raise CheckpointError(f"{shards}: no weights for {missing[0]} (and {len(missing) - 1} more); "
                              "written for another model?")
    sd = {f"model.{k}": v for k, v in model_sd.items()}  # loaded in place, shard by shard
    opt_sd = {f"optim.{k}": v for k, v in optim_lib.state_tensors(opt, raw).items()}
    absent = [k for k in opt_sd if k not in meta]
    if absent:
        raise CheckpointError(f"{shards}: no optimizer state {absent[0][len('optim.'):]}; written with another "
                              "optimizer or model?")
    sd.update(opt_sd)

    def empty(key):
        m = meta[key]
        return torch.empty(tuple(m.size), dtype=m.properties.dtype)
    rng_keys = [k for k in meta if k.startswith("rng.")]
    for kind in ("torch", "cuda"):
        for key in (f"rng.{kind}.{rank}", f"rng.{kind}.0"):
            if key in meta:
                sd[key] = empty(key)
                break
    if trim is not None:
        if "trim.kept" not in meta:
            raise CheckpointError(f"{shards}: written without trim_vocab; resume with --trim_vocab=False")
        sd["trim.kept"], sd["trim.full_embed"] = empty("trim.kept"), empty("trim.full_embed")
    with warnings.catch_warnings():
        if not dist.is_initialized():  # one process reading a sharded checkpoint: what DCP warns about is meant
            warnings.simplefilter("ignore")
        dcp.load(sd, checkpoint_id=shards)
    if trim is not None:
        if not torch.equal(sd["trim.kept"], trim.kept):
            raise CheckpointError(f"{shards}: trimmed to other ids than this run's data gives; same data_dir?")
        trim.full_embed = sd["trim.full_embed"]
    optim_lib.load_state_tensors(opt, raw, {k[len("optim."):]: v for k, v in opt_sd.items()}, where=shards)
    _set_rng(sd.__getitem__, [k for k in rng_keys if k in sd], rank)


def _load_full(path, raw, opt, rank, trim):
    from safetensors import safe_open
    from model import read_safetensors_dir, from_hf_name
    tensors = read_safetensors_dir(path)  # memory-mapped: a process touches only the slices it copies
    if isinstance(raw, model_class({"model_type": "qwen3"})):
        tensors = {from_hf_name(k): v for k, v in tensors.items()}
        if raw.cfg.tie_embeddings:
            tensors.pop("lm_head.weight", None)
    if trim is not None:
        tensors = trim.shrink_state(tensors)
    own = raw.state_dict()
    if own.keys() != tensors.keys():
        extra = sorted(own.keys() ^ tensors.keys())
        raise CheckpointError(f"{path}/model.safetensors: weights do not match the model ({extra[0]} "
                              f"and {len(extra) - 1} more differ); written for another model?")
    for k, v in own.items():
        if tuple(v.shape) != tuple(tensors[k].shape):
            raise CheckpointError(f"{path}/model.safetensors: {k} is {tuple(tensors[k].shape)}, the model's "
                                  f"is {tuple(v.shape)}")
        copy_into(v, tensors[k].to(v.dtype))
    f = os.path.join(path, "trainer_state.safetensors")
    wanted = {}
    with safe_open(f, framework="pt") as st:
        keys = set(st.keys())
        for k, cur in optim_lib.state_tensors(opt, raw).items():  # only this process's parameters
            if f"optim.{k}" not in keys:
                raise CheckpointError(f"{f}: no optimizer state {k}; written with another optimizer or model?")
            t = st.get_tensor(f"optim.{k}")
            wanted[k] = local_part(t, cur).to(cur.device) if _is_dtensor(cur) else t.to(cur.device)
        _set_rng(st.get_tensor, [k for k in keys if k.startswith("rng.")], rank)
    local_state = {}
    for k, cur in optim_lib.state_tensors(opt, raw).items():
        if _is_dtensor(cur):
            with torch.no_grad():
                cur.to_local().copy_(wanted[k])
            local_state[k] = cur
        else:
            local_state[k] = wanted[k]
    optim_lib.load_state_tensors(opt, raw, local_state, where=f)


# ---------------------------------------------------------------------------------------
# consolidation: sharded -> model.safetensors, in one process

def consolidate(path, log=None):
    """Write model.safetensors (+ config.json) of a sharded checkpoint from its shards, in one
    process without a process group; only the weights are read (not the optimizer state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from model_config import ModelConfig
    kind = check(path)
    if kind != "sharded":
        return path  # already full
    shards = os.path.join(path, SHARDS)
    meta = FileSystemReader(shards).read_metadata().state_dict_metadata
    keys = [k for k in meta if k.startswith("model.") or k in ("trim.kept", "trim.full_embed")]
    sd = {k: torch.empty(tuple(meta[k].size), dtype=meta[k].properties.dtype) for k in keys}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
        dcp.load(sd, checkpoint_id=shards, no_dist=True)
    state = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    if "trim.kept" in sd:
        full = sd["trim.full_embed"].to(state["embed.weight"].dtype).clone()
        full[sd["trim.kept"]] = state["embed.weight"]
        state["embed.weight"] = full
    config = _check_json(os.path.join(path, "config.json"))
    cls = model_class(config)
    cfg = ModelConfig.from_hf(config) if config.get("model_type") == "qwen3" else ModelConfig.from_dict(config)
    tmp = os.path.join(path, "weights.tmp")
    _remove(tmp)
    _save_weights(cls, cfg, state, tmp)
    for name in ("model.safetensors", "config.json"):  # each file appears whole
        publish(os.path.join(tmp, name), os.path.join(path, name))
    _remove(tmp)
    if log:
        log(f"consolidated {path}/model.safetensors")
    return path


def main(argv):
    usage = "usage: python checkpoint.py consolidate CKPT_DIR | check OUT_DIR_OR_CKPT"
    if len(argv) != 2 or argv[0] not in ("consolidate", "check"):
        raise CheckpointError(usage)
    cmd, path = argv
    if cmd == "consolidate":
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: no such directory")
        if not os.path.isfile(os.path.join(path, "config.json")):
            path = resolve(path, weights=False)
        consolidate(path, log=print)
        return
    paths = list_checkpoints(path) or [path]
    for p in paths:
        try:
            print(f"{p}: {check(p)}")
        except CheckpointError as e:
            print(f"{p}: damaged: {e}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except CheckpointError as e:
        print(f"checkpoint.py: error: {e}", file=sys.stderr)
        sys.exit(1)
