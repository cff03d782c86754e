"""optim.py: Lion against a hand computation, weight decay on matrices only, 8-bit AdamW / Lion that
train, checkpoint and resume bitwise on CPU, and the fallbacks when bitsandbytes is absent (the import
blocked in a real subprocess)."""
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import checkpoint
import optim
from conftest import ROOT
from model import EncoderDecoder
from model_config import get_preset


def config(kind, lr=1e-2, wd=0.1):
    return SimpleNamespace(optimizer=kind, learning_rate=lr, beta1=0.9, beta2=0.95, weight_decay=wd,
                           parallelism="ddp")


def test_lion_matches_a_hand_computation():
    """Three steps of Lion in float64 against the paper's update written out in numpy."""
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(3, 5))
    grads = [rng.normal(size=(3, 5)) for _ in range(3)]
    lr, wd, b1, b2 = 0.01, 0.3, 0.9, 0.99
    p, m = p0.copy(), np.zeros_like(p0)
    for g in grads:
        c = b1 * m + (1 - b1) * g
        p = p * (1 - lr * wd) - lr * np.sign(c)
        m = b2 * m + (1 - b2) * g
    w = torch.nn.Parameter(torch.tensor(p0))
    opt = optim.Lion([w], lr=lr, betas=(b1, b2), weight_decay=wd)
    for g in grads:
        w.grad = torch.tensor(g)
        opt.step()
    assert np.allclose(w.detach().numpy(), p, rtol=0, atol=1e-14)
    assert np.allclose(opt.state[w]["exp_avg"].numpy(), m, rtol=0, atol=1e-14)


def test_weight_decay_on_matrices_only():
    model = EncoderDecoder(get_preset("tiny_encdec", vocab_size=300))
    opt = optim.make_optimizer(model, config("adamw"), world=1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert any(p is model.embed.weight for p in no_decay["params"])
    assert all(p.dim() == 1 or p is model.embed.weight for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults.get("fused") is True and opt.chosen == "torch.AdamW"


def copy_batch(step):
    """A learnable task for the tiny model: two fixed batches, the decoder repeats the encoder's tokens."""
    g = torch.Generator().manual_seed(step % 2)
    ids = torch.randint(0, 300, (4, 10), generator=g)
    return ids, torch.ones_like(ids, dtype=torch.bool), ids, ids


def train_steps(model, opt, first, last):
    out = []
    for step in range(first, last):
        enc, mask, dec, labels = copy_batch(step)
        _, loss = model(enc, mask, dec, labels=labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


def fresh(kind, seed):
    torch.manual_seed(seed)
    model = EncoderDecoder(get_preset("tiny_encdec", vocab_size=300))
    return model, optim.make_optimizer(model, config(kind, lr=3e-3), world=1)


@pytest.mark.parametrize("kind", ["adamw8bit", "lion8bit", "lion", "adamw",
                                  pytest.param("adamw8bit-torchao", marks=pytest.mark.slow)])  # compiles: ~25 s
def test_optimizer_trains_checkpoints_and_resumes_bitwise(tmp_path, kind, monkeypatch):
    if kind == "adamw8bit-torchao":  # the first fallback: bitsandbytes unavailable, torchao present
        pytest.importorskip("torchao")
        monkeypatch.setattr(optim, "_bnb", lambda: None)
        kind = "adamw8bit"
    elif kind != "adamw":
        pytest.importorskip("bitsandbytes")
    model, opt = fresh(kind, seed=0)
    straight = train_steps(model, opt, 0, 12)
    assert np.mean(straight[-3:]) < 0.8 * straight[0], straight  # it learns
    if kind.endswith("8bit"):  # really 8-bit state for the big matrices
        assert opt.chosen.startswith(("bitsandbytes.", "torchao."))
        assert any(v.dtype == torch.uint8 for k, v in optim.state_tensors(opt, model).items())

    model2, opt2 = fresh(kind, seed=0)
    first = train_steps(model2, opt2, 0, 6)
    path = checkpoint.save(str(tmp_path), 6, model2, opt2, {"iter": 6})
    before = torch.get_rng_state()
    torch.manual_seed(99)  # a different initialisation, so everything must come from the checkpoint
    model3, opt3 = fresh(kind, seed=1)
    state = checkpoint.load(path, model3, opt3)
    assert state["iter"] == 6 and torch.equal(torch.get_rng_state(), before)
    rest = train_steps(model3, opt3, 6, 12)
    assert first + rest == straight
    for (n, a), b in zip(model.named_parameters(), model3.parameters()):
        assert torch.equal(a, b), n
    sa, sb = optim.state_tensors(opt, model), optim.state_tensors(opt3, model3)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_with_another_optimizer_is_one_line(tmp_path):
    model, opt = fresh("adamw", seed=0)
    train_steps(model, opt, 0, 1)
    path = checkpoint.save(str(tmp_path), 1, model, opt, {"iter": 1})
    model2, opt2 = fresh("lion", seed=0)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(path, model2, opt2)
    assert "\n" not in str(e.value) and "torch.AdamW" in str(e.value) and "--optimizer" in str(e.value)


BLOCKED = """
import sys
sys.modules["bitsandbytes"] = None  # `import bitsandbytes` now raises ImportError, as if not installed
sys.modules["torchao"] = None
sys.path.insert(0, {root!r})
from types import SimpleNamespace
import torch
import optim
for kind in ("adamw8bit", "lion8bit", "lion"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    c = SimpleNamespace(optimizer=kind, learning_rate=1e-2, beta1=0.9, beta2=0.95, weight_decay=0.1,
                        parallelism="ddp")
    print(f"[{{kind}}]", file=sys.stderr, flush=True)
    opt = optim.make_optimizer(model, c, world=1)
    x = torch.randn(32, 8)
    losses = []
    for _ in range(5):
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print(kind, opt.chosen, type(opt).__name__, losses[-1] < losses[0])
"""


def test_without_bitsandbytes_the_fallback_is_taken_with_one_warning():
    """In a process where `import bitsandbytes` (and torchao) fails: adamw8bit -> torch AdamW,
    lion8bit and lion -> optim.Lion; each optimiser says so in exactly one warning line, and trains."""
    p = subprocess.run([sys.executable, "-c", BLOCKED.format(root=ROOT)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.splitlines() == ["adamw8bit torch.AdamW AdamW True", "lion8bit optim.Lion Lion True",
                                     "lion optim.Lion Lion True"]
    said = {}
    for line in p.stderr.splitlines():
        if line.startswith("["):
            kind = line.strip("[]")
            said[kind] = []
        elif line.strip():
            said[kind].append(line)
    for kind, lines in said.items():
        assert len(lines) == 1 and lines[0].startswith(f"warning: optimizer '{kind}'"), (kind, p.stderr)
        assert "bitsandbytes is not installed" in lines[0]
    assert "torchao" in said["adamw8bit"][0]


def test_fsdp_takes_no_bitsandbytes():
    """bitsandbytes' kernels refuse FSDP's DTensor shards; the choice says so in one line."""
    said = []
    cls, _, chosen = optim.choose("lion8bit", sharded=True, log=said.append)
    assert cls is optim.Lion and chosen == "optim.Lion" and len(said) == 1 and "FSDP" in said[0]
    with pytest.raises(ValueError, match="'optimizer'"):
        optim.choose("sgd")
