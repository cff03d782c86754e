"""kernels.py: every Triton kernel (run by the Triton interpreter on CPU) against its torch
reference, outputs and gradients, on odd shapes; the chunked cross-entropy against naive
logits-then-cross-entropy; the kernels compiled for a real GPU (sm_90) without one.

Tolerances: fp32 within 1e-5 of the reference (relative, at the tensor's scale); fp16 within
4e-3 (four fp16 ulps at the tensor's scale: the reference rounds after every op, the kernels
once at the end). bf16 is not run in the interpreter, whose bf16 arithmetic is inexact; the
compile test builds the bf16 kernels for sm_90.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels  # tests/conftest.py has already imported triton in interpreter mode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = {torch.float32: 1e-5, torch.float16: 4e-3}
INTERPRETER = kernels.triton is not None and type(kernels.tl.sum).__name__ == "InterpretedFunction"
needs_interpreter = pytest.mark.skipif(
    not INTERPRETER, reason="triton missing, or imported for GPUs earlier in this process: "
                            "test_interpreter_tests_in_fresh_process runs these")


@pytest.fixture
def interpreted(monkeypatch):
    """Triton path on CPU tensors through the interpreter; restored afterwards."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels.use_triton(True)
    yield
    kernels.use_triton(False)


def close(actual, expected, dtype):
    tol = TOL[dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol,
                               atol=tol * expected.float().abs().max().item())


def run_both(fast, ref, inputs, seed=0):
    """Outputs and input gradients of fast(*inputs) and ref(*inputs) under one random output gradient."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    out = fast(*inputs)
    out_ref = ref(*inputs)
    g = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(seed)).to(out_ref.dtype)
    return (out, *torch.autograd.grad(out, leaves, g)), (out_ref, *torch.autograd.grad(out_ref, leaves, g))


def leaf(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype).requires_grad_()


# ---------------------------------------------------------------------------------------
# elementwise / row kernels

@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 37, 200), (100, 128), (1, 1, 7)])  # odd widths, rows off the block
def test_rms_norm(interpreted, dtype, shape):
    torch.manual_seed(0)
    x = leaf(*shape, dtype=dtype, scale=3.0)
    w = leaf(shape[-1], dtype=dtype)
    for got, want in zip(*run_both(kernels.rms_norm, kernels.rms_norm_ref, (x, w, 1e-6))):
        close(got, want, dtype)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(5, 333), (2, 9, 3000)])
def test_swiglu(interpreted, dtype, shape):
    torch.manual_seed(0)
    gate, up = leaf(*shape, dtype=dtype, scale=3.0), leaf(*shape, dtype=dtype)
    for got, want in zip(*run_both(kernels.swiglu, kernels.swiglu_ref, (gate, up))):
        close(got, want, dtype)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("table", ["[T,D]", "[B,T,D]", "[1,T,D]"])
def test_apply_rotary(interpreted, dtype, table):
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 37, 24  # half width 12: not a power of two
    # queries as the model makes them: [B, T, H, D] transposed, so not contiguous
    x = torch.randn(B, T, H, D).to(dtype).transpose(1, 2).requires_grad_()
    ang = {"[T,D]": torch.randn(T, D), "[B,T,D]": torch.randn(B, T, D), "[1,T,D]": torch.randn(1, T, D)}[table]
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)  # halves differ: the general form
    for got, want in zip(*run_both(kernels.apply_rotary, kernels.apply_rotary_ref, (x, cos, sin))):
        close(got, want, dtype)


@needs_interpreter
def test_rotary_fp32_tables_promote_like_reference(interpreted):
    # the model may pass fp32 cos/sin with half-precision queries: output dtype follows torch promotion
    x = leaf(1, 2, 5, 8, dtype=torch.float16)
    ang = torch.randn(5, 8)
    for got, want in zip(*run_both(kernels.apply_rotary, kernels.apply_rotary_ref, (x, ang.cos(), ang.sin()))):
        close(got, want, got.dtype)


def test_reference_used_when_switched_off(monkeypatch):
    # off by default, and off for CPU tensors unless the interpreter is asked for
    def boom(*a):
        raise AssertionError("Triton path taken")
    for cls in ("_RMSNorm", "_SwiGLU", "_Rotary"):
        monkeypatch.setattr(getattr(kernels, cls), "apply", boom)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 3, 4, 8)
    for flag in (False, True):
        kernels.use_triton(flag)
        try:
            kernels.rms_norm(x, torch.ones(8), 1e-6)
            kernels.swiglu(x, x)
            kernels.apply_rotary(x, torch.ones(4, 8), torch.zeros(4, 8))
        finally:
            kernels.use_triton(False)


def test_imports_and_falls_back_without_triton():
    code = ("import sys; sys.modules['triton'] = None; import torch, kernels; kernels.use_triton(True); "
            "x = torch.randn(3, 8); y = kernels.rms_norm(x, torch.ones(8), 1e-6); "
            "assert kernels.triton is None and torch.equal(y, kernels.rms_norm_ref(x, torch.ones(8), 1e-6))")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


# ---------------------------------------------------------------------------------------
# linear cross-entropy

def naive_ce(hidden, weight, labels):
    """The thing the chunked versions replace: full fp32 logits, then cross-entropy."""
    return F.cross_entropy(hidden.float() @ weight.float().t(), labels, ignore_index=-100)


def ce_inputs(n, c, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, c, generator=g) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, labels


def ce_grads(fn, hidden, weight, labels, **kw):
    loss = fn(hidden, weight, labels, **kw)
    return (loss, *torch.autograd.grad(loss, (hidden, weight)))


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_ce_full_vocab(interpreted, dtype):
    # vocab 152,036; 13 rows in chunks of 4 (last chunk partial); one chunk entirely ignored
    hidden, weight, labels = ce_inputs(13, 16, 152036, dtype)
    labels[3] = -100
    labels[4:8] = -100
    labels[12] = 152035  # last class, in the masked tail of the last vocab block
    got = ce_grads(kernels.linear_cross_entropy, hidden, weight, labels, chunk_size=4)
    want = ce_grads(naive_ce, hidden, weight, labels)
    assert got[0].dtype == torch.float32
    close(got[0], want[0], dtype)
    for g, w in zip(got[1:], want[1:]):
        close(g, w.to(dtype), dtype)
    assert not got[1][4:8].any()  # ignored rows get exactly zero gradient


@needs_interpreter
def test_fused_ce_matches_torch_chunked(interpreted):
    hidden, weight, labels = ce_inputs(50, 24, 1000, torch.float32)
    labels[::7] = -100
    got = ce_grads(kernels.linear_cross_entropy, hidden, weight, labels, chunk_size=16)
    want = ce_grads(kernels.linear_cross_entropy_ref, hidden, weight, labels, chunk_size=16)
    for g, w in zip(got, want):
        close(g, w, torch.float32)


@pytest.mark.parametrize("chunk_size", [None, 64, 1000])
def test_chunked_ce_equals_naive(chunk_size):
    # done-when 2's equality, at a smaller shape: 300 tokens x 64 x vocab 5,000, 10 % ignored
    hidden, weight, labels = ce_inputs(300, 64, 5000, torch.float32)
    labels[torch.rand(300, generator=torch.Generator().manual_seed(1)) < 0.1] = -100
    got = ce_grads(kernels.linear_cross_entropy_ref, hidden, weight, labels, chunk_size=chunk_size)
    want = ce_grads(naive_ce, hidden, weight, labels)
    for g, w in zip(got, want):
        close(g, w, torch.float32)


@pytest.mark.parametrize("triton_path", [False, True])
def test_ce_all_ignored_and_scaled(monkeypatch, triton_path):
    if triton_path:
        if not INTERPRETER:
            pytest.skip("no interpreter here: test_interpreter_tests_in_fresh_process runs this")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels.use_triton(triton_path)
    try:
        hidden, weight, labels = ce_inputs(10, 8, 300, torch.float32)
        loss, gh, gw = ce_grads(kernels.linear_cross_entropy, hidden, weight, torch.full_like(labels, -100))
        assert loss.item() == 0.0 and not gh.any() and not gw.any()
        # a loss scaled after the fact (grad accumulation) scales the gradients, like any loss
        labels[:3] = -100
        loss = kernels.linear_cross_entropy(hidden, weight, labels, chunk_size=4)
        gh, gw = torch.autograd.grad(loss * 0.25, (hidden, weight))
        want = ce_grads(lambda *a: naive_ce(*a) * 0.25, hidden, weight, labels)
        close(gh, want[1], torch.float32)
        close(gw, want[2], torch.float32)
    finally:
        kernels.use_triton(False)


def test_ce_rejects_bad_shapes():
    with pytest.raises(ValueError, match="linear_cross_entropy"):
        kernels.linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))


# ---------------------------------------------------------------------------------------
# where the interpreter can't run here, and the real compiler

@pytest.mark.skipif(INTERPRETER or kernels.triton is None, reason="the interpreter tests ran in this process")
def test_interpreter_tests_in_fresh_process():
    out = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
                          "-k", "not fresh_process and not compile"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]


COMPILE_FOR_SM90 = """
import triton, kernels
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
p, i = "*bf16", "i32"
cases = [
    (kernels._rms_norm_fwd_kernel, dict(X=p, W=p, Y=p, RSTD="*fp32", n_rows=i, n_cols=i, eps="fp32"),
     dict(BLOCK_R=4, BLOCK_C=1024)),
    (kernels._rms_norm_bwd_kernel, dict(DY=p, X=p, W=p, RSTD="*fp32", DX=p, DW_PART="*fp32", n_rows=i,
                                        n_cols=i, rows_per_prog=i), dict(BLOCK_R=4, BLOCK_C=1024)),
    (kernels._swiglu_fwd_kernel, dict(G=p, U=p, Y=p, n=i), dict(BLOCK=4096)),
    (kernels._swiglu_bwd_kernel, dict(DY=p, G=p, U=p, DG=p, DU=p, n=i), dict(BLOCK=4096)),
    (kernels._rotary_kernel, dict(X=p, COS=p, SIN=p, Y=p, H=i, T=i, HALF=i, sxb=i, sxh=i, sxt=i, scb=i,
                                  sct=i, syb=i, syh=i, syt=i), dict(BACKWARD=True, BLOCK_T=32, BLOCK_D=64)),
    (kernels._ce_grad_kernel, dict(LOGITS=p, LABELS="*i64", LOSS="*fp32", stride_row=i, V=i,
                                   ignore_index=i), dict(BLOCK_V=4096)),
]
for fn, sig, const in cases:
    src = ASTSource(fn=triton.jit(fn), signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const)
    assert len(triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["cubin"]) > 0, fn.__name__
"""


@pytest.mark.slow  # about 10 s: the real compiler for six kernels
@pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
def test_kernels_compile_for_sm90():
    """Build each kernel for an H100 (sm_90) with bf16 pointers: Triton's real front end and
    backend (ttir -> ttgir -> llvm -> ptx -> cubin), which the interpreter never runs. In a fresh
    process, since this one's triton library may be built for the interpreter."""
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the current default, named to silence Triton 3.9's warning
    out = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


# ---------------------------------------------------------------------------------------
# the model with the kernels on and off (done-when 3)

def model_loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    _, loss = model(**batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@needs_interpreter
@pytest.mark.parametrize("preset", ["tiny", "tiny_encdec"])
def test_model_same_loss_and_grads_with_triton(interpreted, monkeypatch, preset):
    from model import EncoderDecoder, Qwen3
    from model_config import get_preset
    launched = set()
    jit = kernels._kernel
    monkeypatch.setattr(kernels, "_kernel", lambda fn: launched.add(fn.__name__) or jit(fn))
    torch.manual_seed(0)
    # one layer per stack: the interpreter pays about 0.2 s per launch
    cfg = get_preset(preset, num_layers=1, num_encoder_layers=1 if preset == "tiny_encdec" else 0)
    g = torch.Generator().manual_seed(1)
    B, S, T = 2, 10, 8
    labels = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    labels[1, 5:] = -100
    if cfg.num_encoder_layers:
        model = EncoderDecoder(cfg)
        enc_mask = torch.ones(B, S, dtype=torch.bool)
        enc_mask[1, 7:] = False  # padding in the encoder input
        batch = dict(enc_ids=torch.randint(0, cfg.vocab_size, (B, S), generator=g), enc_mask=enc_mask,
                     dec_ids=torch.randint(0, cfg.vocab_size, (B, T), generator=g), labels=labels)
    else:
        model = Qwen3(cfg)
        batch = dict(idx=torch.randint(0, cfg.vocab_size, (B, T), generator=g), labels=labels)
    with torch.no_grad():  # norm weights away from 1, so a wrong weight gradient shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    loss_on, grads_on = model_loss_and_grads(model, batch)
    assert launched == {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel",
                        "_rotary_kernel", "_ce_grad_kernel"}
    kernels.use_triton(False)
    loss_off, grads_off = model_loss_and_grads(model, batch)
    close(loss_on, loss_off, torch.float32)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) == len(list(model.parameters()))
    for name in grads_off:
        close(grads_on[name], grads_off[name], torch.float32)


def test_cross_entropy_under_no_grad_computes_no_gradient():
    """Evaluation pays for the loss only: under no_grad the forward skips the gradient matmuls."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 300, (40,), generator=g)
    calls = []
    original = torch.mm

    def counting_mm(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    torch.mm = counting_mm
    try:
        with torch.no_grad():
            loss = kernels.linear_cross_entropy(h, w, y, chunk_size=64)
    finally:
        torch.mm = original
    assert len(calls) == 1  # the logits; no grad_hidden matmul
    assert abs(loss.item() - F.cross_entropy(h @ w.t(), y).item()) < 1e-5
