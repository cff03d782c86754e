"""Optimisers for train.py, and their state as {parameter name: tensors} for checkpoints.

    optimizer = 'adamw'      torch AdamW (fused kernel: on CUDA, and on CPU ~5x faster than for-each)
              = 'adamw8bit'  bitsandbytes AdamW8bit; else torchao's AdamW8bit; else torch AdamW
              = 'lion8bit'   bitsandbytes Lion8bit; else Lion below (32-bit state)
              = 'lion'       bitsandbytes Lion; else Lion below

Every fallback prints one warning line. Weight decay goes on matrices only. Under torchrun with
parallelism='zero1' the chosen class runs inside ZeroRedundancyOptimizer (each process keeps
the state of its share of the parameters).

The state is exchanged by parameter name, not by the optimiser's integer ids, so a checkpoint
moves between process counts and parallelisms: state_tensors() gives this process's state as
flat '{name}.{key}' tensors, load_state_tensors() puts such tensors back bitwise.
"""
import sys

import torch

OPTIMIZERS = ("adamw", "adamw8bit", "lion8bit", "lion")


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the update is the
    sign of an interpolation between the momentum and the gradient, so every element moves by
    exactly lr; one state tensor (the momentum) instead of Adam's two. Decoupled weight decay as
    in AdamW. Typical settings: lr 3-10x below AdamW's, weight decay 3-10x above, betas (0.9, 0.99)."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        if lr < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Lion: bad lr {lr} or betas {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, (b1, b2) = group["lr"], group["weight_decay"], group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m, g = state["exp_avg"], p.grad
                update = m.lerp(g, 1 - b1).sign_()  # sign(b1 * m + (1 - b1) * g); one temporary
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr)
                m.lerp_(g, 1 - b2)  # the momentum itself uses b2
        return loss


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _bnb():
    try:
        import bitsandbytes
        return bitsandbytes
    except Exception:  # absent, or present but broken (no native library for this platform)
        return None


def _lr_as_tensor(cls):
    """torchao's optimisers keep lr as a tensor (an input of their compiled step) and refuse a float;
    train.py sets a float every iteration. Turn it back into a tensor before each step."""
    class LrAsTensor(cls):
        def step(self, closure=None):
            for g in self.param_groups:
                if not torch.is_tensor(g["lr"]):
                    g["lr"] = torch.tensor(float(g["lr"]))
            return super().step(closure)
    LrAsTensor.__name__ = cls.__name__
    return LrAsTensor


def choose(kind, sharded=False, log=warn):
    """(optimizer class, its keyword arguments besides lr / betas / weight decay, name) for `kind`."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"config key 'optimizer' is {kind!r}; choose one of {', '.join(OPTIMIZERS)}")
    adamw = (torch.optim.AdamW, {"fused": True}, "torch.AdamW")
    if kind == "adamw":
        return adamw
    # bitsandbytes reaches into p.data, which FSDP2's sharded DTensor parameters do not allow
    bnb = None if sharded else _bnb()
    why = "FSDP shards parameters as DTensors, which bitsandbytes does not take" if sharded else \
        "bitsandbytes is not installed (pip install bitsandbytes)"
    if kind == "adamw8bit":
        if bnb is not None:
            return bnb.optim.AdamW8bit, {}, "bitsandbytes.AdamW8bit"
        try:
            from torchao.optim import AdamW8bit
            log(f"optimizer 'adamw8bit': {why}; using torchao's AdamW8bit")
            return _lr_as_tensor(AdamW8bit), {}, "torchao.AdamW8bit"
        except Exception:
            log(f"optimizer 'adamw8bit': {why} and torchao is not either; using torch AdamW (32-bit state)")
            return adamw
    name = "Lion8bit" if kind == "lion8bit" else "Lion"
    if bnb is not None:
        return getattr(bnb.optim, name), {}, f"bitsandbytes.{name}"
    log(f"optimizer '{kind}': {why}; using optim.Lion (torch, 32-bit state)")
    return Lion, {}, "optim.Lion"


def param_groups(model, weight_decay):
    """Weight decay on matrices only. Norm weights are scales around 1 and the embedding is also the
    output layer of 152K rows, most of them rare: decaying either pulls them toward zero for no
    benefit, as GPT-2/nanoGPT and most LLM recipes choose."""
    embed = getattr(model, "embed", None)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or (embed is not None and p is embed.weight) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, c, world, extra=(), log=warn):
    """The optimiser named by c.optimizer over the (unwrapped) model's parameters, plus `extra`
    [(name, parameter)] outside the model (an objective's own, e.g. a learnable temperature; no
    weight decay). Its attribute `chosen` names the class that really runs (what the fallbacks
    picked), for checkpoints; `names` maps each parameter to the name its state is saved under."""
    sharded = world > 1 and c.parallelism == "fsdp"
    cls, kw_extra, chosen = choose(getattr(c, "optimizer", "adamw"), sharded, log)
    kw = dict(lr=c.learning_rate, betas=(c.beta1, c.beta2), **kw_extra)
    groups = param_groups(model, c.weight_decay)
    groups[1]["params"] += [p for _, p in extra]
    if world > 1 and c.parallelism == "zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer
        opt = ZeroRedundancyOptimizer(groups, optimizer_class=cls, **kw)
    else:
        opt = cls(groups, **kw)
    opt.chosen = chosen
    opt.names = {id(p): n for n, p in [*model.named_parameters(), *extra]}
    return opt


# ---------------------------------------------------------------------------------------
# state by parameter name

def local(opt):
    """The optimiser that holds this process's state (ZeroRedundancyOptimizer wraps one)."""
    return getattr(opt, "optim", opt)


def owned(opt, model):
    """[(name, parameter)] whose state this process keeps, in the optimiser's order."""
    name_of = getattr(opt, "names", None) or {id(p): n for n, p in model.named_parameters()}
    return [(name_of[id(p)], p) for g in local(opt).param_groups for p in g["params"]]


def init_state(opt, model):
    """Create every owned parameter's state (as the first step would), without moving the
    parameters: a step on zero gradients at learning rate 0. The values are overwritten by a load."""
    inner = local(opt)
    if all(inner.state.get(p) for _, p in owned(opt, model)):
        return
    grads = {}
    for _, p in owned(opt, model):
        grads[p] = p.grad
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in inner.param_groups]
    for g in inner.param_groups:
        g["lr"] = 0.0
    inner.step()  # the local optimiser only: no collectives (ZeRO's own step would broadcast)
    for g, lr in zip(inner.param_groups, lrs):
        g["lr"] = lr
    for p, grad in grads.items():
        p.grad = grad


def _as_tensor(v):
    if torch.is_tensor(v):
        return v
    if isinstance(v, bool):
        return torch.tensor(v)
    if isinstance(v, int):
        return torch.tensor(v, dtype=torch.int64)
    if isinstance(v, float):
        return torch.tensor(v, dtype=torch.float64)
    return None  # e.g. None: nothing to keep


def _parts(key, v):
    """(key, value) pairs of one state entry. A quantised state tensor (torchao's OptimState8bit: a
    tensor subclass over uint8 codes and scales) becomes its inner tensors, 'KEY.codes', 'KEY.scale', ...,
    which are the live storage (so a load can fill them in place). DTensors stay whole: a distributed
    checkpoint writes their shards."""
    from torch.distributed.tensor import DTensor
    if torch.is_tensor(v) and type(v) not in (torch.Tensor, torch.nn.Parameter, DTensor) and \
            hasattr(v, "__tensor_flatten__"):
        for attr in v.__tensor_flatten__()[0]:
            yield from _parts(f"{key}.{attr}", getattr(v, attr))
    else:
        yield key, v


def _entries(opt, model):
    """(state dict, key in it, flat name, current value) for every kept piece of this process's state."""
    inner = local(opt)
    for name, p in owned(opt, model):
        state = inner.state.get(p, {})
        for k, v in state.items():
            for flat, part in _parts(f"{name}.{k}", v):
                if _as_tensor(part) is not None:
                    yield state, k, flat, part


def state_tensors(opt, model):
    """This process's optimiser state: {'{name}.{key}': tensor} (python numbers as 0-d tensors;
    DTensors stay DTensors, so a distributed checkpoint writes each shard once)."""
    return {flat: _as_tensor(v) for _, _, flat, v in _entries(opt, model)}


def load_state_tensors(opt, model, tensors, where="checkpoint"):
    """Put {'{name}.{key}': tensor} back into the (initialised) state, bitwise. A tensor that is
    already the state itself (loaded in place by torch.distributed.checkpoint) is left alone."""
    init_state(opt, model)
    for state, k, key, cur in list(_entries(opt, model)):
        if key not in tensors:
            raise KeyError(f"{where}: no optimizer state '{key}'; was it written with another optimizer or model?")
        t = tensors[key]
        if not torch.is_tensor(cur):  # a python number (bitsandbytes' step)
            state[k] = type(cur)(t.item())
        elif t is not cur:
            if tuple(t.shape) != tuple(cur.shape) or t.dtype != cur.dtype:
                raise ValueError(f"{where}: optimizer state '{key}' is {t.dtype} {tuple(t.shape)}, this run's "
                                 f"is {cur.dtype} {tuple(cur.shape)}; was it written with another optimizer?")
            with torch.no_grad():
                cur.copy_(t)
