"""Fused kernels and their torch references.

Every op here has a plain torch version, which is both the reference the tests compare
against and the fallback used on CPU. The Triton versions run only when switched on
with `use_triton(True)` and the tensors live on CUDA (or TRITON_INTERPRET=1 is set, which
Triton must see before its first import). Under torch.compile the references run too:
inductor fuses them itself.

Ops: rms_norm, swiglu, apply_rotary (each forward + backward) and linear_cross_entropy,
which never holds the [N, V] logits: per chunk of tokens it computes the logits with a
matmul, overwrites them in place with d loss / d logits (softmax - onehot; a Triton kernel
on GPU, torch ops on CPU), and turns that into the hidden and weight gradients with two
more matmuls, all in the forward pass (the loss is the last op of the graph, so backward
only scales).
"""
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch references serve every call
    triton = None

_USE_TRITON = False


def use_triton(flag: bool):
    global _USE_TRITON
    _USE_TRITON = bool(flag)


# ---------------------------------------------------------------------------------------
# torch references

def rms_norm_ref(x, weight, eps):
    # Qwen3 normalises in fp32 and casts back before the weight multiply
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def swiglu_ref(gate, up):
    return F.silu(gate) * up


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_ref(x, cos, sin):
    # x [B, H, T, D]; cos/sin [T, D] or [B, T, D]
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def _ce_grad_torch(logits, labels, ignore_index):
    """In place: fp32 logits [n, V] -> softmax - onehot(label), zero on rows whose label is ignored.
    Returns the summed loss of the chunk. No [n, V] temporary: log_softmax writes over its own
    input, which is safe because each row is read (max, sum) before it is written."""
    ok = labels != ignore_index
    y = torch.where(ok, labels, 0)
    rows = torch.arange(len(y), device=logits.device)
    torch.ops.aten._log_softmax.out(logits, 1, False, out=logits)
    loss = -torch.where(ok, logits[rows, y], 0.0).sum()
    logits.exp_()
    logits.index_put_((rows, y), torch.full_like(y, -1, dtype=logits.dtype), accumulate=True)
    logits.index_fill_(0, (~ok).nonzero().squeeze(1), 0.0)  # writes the ignored rows only
    return loss


def _default_chunk(n, vocab, itemsize, cuda):
    # logits per chunk: 160 MiB on CPU (256 rows at 152K classes: CPU matmuls lose ~25 % of their
    # speed below that); 1 GiB on GPU, where every chunk also rereads the fp32 weight gradient.
    # Both small next to the full [N, V] (5 GB in fp32 at 8K tokens x 152K classes).
    rows = ((1 << 30) if cuda else (160 << 20)) // (vocab * itemsize) // 64 * 64
    return max(64, min(rows, n))


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (hidden @ weight.T) over labels != ignore_index, chunk by chunk.

    Gradients are finished in forward and kept on ctx (not save_for_backward) so backward can
    drop its references and autograd can adopt the buffers without a copy. Backward runs once."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size, fused, mean):
        n, vocab = hidden.shape[0], weight.shape[0]
        # the matmuls run in the hidden states' dtype (bf16 under autocast); the weight's own gradient
        # is accumulated in fp32 and handed back in the weight's dtype
        param = weight
        weight = weight.to(hidden.dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # one host sync for every chunk's count of real labels
        valid = (labels != ignore_index).int()
        counts = F.pad(valid, (0, -n % chunk_size)).view(-1, chunk_size).sum(1).tolist() if n else []
        scale = 1.0 / max(sum(counts), 1) if mean else 1.0
        # the Triton kernel reads and writes the matmul's own dtype; torch works on fp32 logits
        buf = torch.empty(min(chunk_size, n), vocab, device=hidden.device,
                          dtype=hidden.dtype if fused else torch.float32)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = None  # fp32, written by the first chunk's matmul (no zero fill)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i, start in enumerate(range(0, n, chunk_size)):
            end = min(start + chunk_size, n)
            h, y = hidden[start:end], labels[start:end]
            if counts[i] == 0:  # every label ignored: no loss, no gradient, no matmul
                if need_h:
                    grad_hidden[start:end].zero_()
                continue
            logits = buf[:end - start]
            if logits.dtype == h.dtype:
                torch.mm(h, weight.t(), out=logits)
            else:
                logits.copy_(h @ weight.t())
            loss += (_ce_grad_triton if fused else _ce_grad_torch)(logits, y, ignore_index)
            grad = logits.to(hidden.dtype)  # a no-op unless the torch path runs in half precision
            if need_h:
                torch.mm(grad, weight, out=grad_hidden[start:end])
            if need_w:
                if grad_weight is None:
                    grad_weight = (grad.t() @ h).float()
                elif grad_weight.dtype == grad.dtype:
                    grad_weight.addmm_(grad.t(), h)
                else:  # half-precision weights still accumulate their gradient in fp32
                    grad_weight += grad.t() @ h
        # the mean's 1/n_valid, applied once to each gradient (in fp32 for the weight's)
        if need_h:
            grad_hidden.mul_(scale)
        if need_w:
            grad_weight = torch.zeros(weight.shape, device=weight.device) if grad_weight is None else grad_weight
            grad_weight = grad_weight.mul_(scale).to(param.dtype)
        ctx.grad_hidden, ctx.grad_weight = grad_hidden, grad_weight
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        del ctx.grad_hidden, ctx.grad_weight
        # the loss is usually the root (grad 1): skip a pass over the [V, C] gradient then (a free
        # check on CPU; on GPU the multiply costs less than a host sync)
        if grad_loss.is_cuda or grad_loss.item() != 1.0:
            for g in (grad_hidden, grad_weight):
                if g is not None:
                    g.mul_(grad_loss.to(g.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None


def _linear_cross_entropy(hidden, weight, labels, ignore_index, chunk_size, fused, reduction="mean"):
    if hidden.dim() != 2 or weight.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"kernels.linear_cross_entropy: want hidden [N, C], weight [V, C], labels [N]; "
                         f"got {tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"kernels.linear_cross_entropy: reduction={reduction!r}; choose 'mean' or 'sum'")
    # the out= matmuls inside bypass autocast, so apply its rule here: under autocast the head's
    # matmuls run in the autocast dtype (the final norm hands over fp32 states); loss and
    # log-sum-exp stay fp32 either way. Without autocast, a half-precision hidden sets the dtype.
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        hidden = hidden.to(torch.get_autocast_dtype(dev))
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype) if hidden.element_size() > weight.element_size() else hidden
    if not torch.is_grad_enabled():  # evaluation: detached inputs tell forward to skip the gradients
        hidden, weight = hidden.detach(), weight.detach()
    itemsize = hidden.element_size() if fused else 4
    chunk_size = chunk_size or _default_chunk(hidden.shape[0], weight.shape[0], itemsize, hidden.is_cuda)
    return _LinearCrossEntropy.apply(hidden.contiguous(), weight.contiguous(), labels.contiguous(),
                                     ignore_index, int(chunk_size), fused, reduction == "mean")


def linear_cross_entropy_ref(hidden, weight, labels, ignore_index=-100, chunk_size=None, reduction="mean"):
    """Mean (or summed) cross-entropy over labels != ignore_index (0 when every label is ignored), in
    chunks of tokens on torch ops. chunk_size=None picks the rows by memory, see _default_chunk."""
    return _linear_cross_entropy(hidden, weight, labels, ignore_index, chunk_size, False, reduction)


# ---------------------------------------------------------------------------------------
# dispatch: the model calls these

def _interpret():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_ok(x):
    if triton is None or not _USE_TRITON or torch.compiler.is_compiling():
        return False
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    return x.is_cuda or _interpret()


def rms_norm(x, weight, eps):
    if _triton_ok(x) and x.shape[-1] <= _MAX_COLS:
        return _RMSNorm.apply(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def swiglu(gate, up):
    if _triton_ok(gate) and gate.shape == up.shape:
        return _SwiGLU.apply(gate, up)
    return swiglu_ref(gate, up)


def apply_rotary(x, cos, sin):
    if (_triton_ok(x) and x.dim() == 4 and x.shape[-1] % 2 == 0 and cos.shape == sin.shape
            and not (cos.requires_grad or sin.requires_grad)):
        return _Rotary.apply(x, cos, sin)
    return apply_rotary_ref(x, cos, sin)


@torch.compiler.disable  # a Python loop of large matmuls: nothing for a compiler to fuse
def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, chunk_size=None, reduction="mean"):
    """Mean (or summed) cross-entropy of hidden [N, C] @ weight[V, C].T against labels [N], never holding [N, V]."""
    return _linear_cross_entropy(hidden, weight, labels, ignore_index, chunk_size, _triton_ok(hidden), reduction)


# ---------------------------------------------------------------------------------------
# Triton: launch helpers and autograd functions

_MAX_COLS = 65536  # rms_norm keeps a whole row in one block
_jitted = {}


def _kernel(fn):
    """triton.jit at first use, so TRITON_INTERPRET is read when a kernel runs, not at import."""
    key = (fn.__name__, _interpret())
    if key not in _jitted:
        if key[1] and type(tl.sum).__name__ != "InterpretedFunction":
            raise RuntimeError("kernels.py: TRITON_INTERPRET=1 was set after triton was imported; "
                               "set it before the first import of triton (or of torch._inductor)")
        _jitted[key] = triton.jit(fn)
    return _jitted[key]


def _block_elems():
    # the interpreter pays per program, a GPU wants small tiles in registers
    return 16384 if _interpret() else 4096


def _warps(elems):
    return 4 if elems <= 2048 else 8


def _num_programs(x, work_items):
    if x.is_cuda and not _interpret():
        return min(work_items, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    return min(work_items, 2)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape, cols = x.shape, x.shape[-1]
        x2 = x.reshape(-1, cols).contiguous()
        w = weight.contiguous()
        rows = x2.shape[0]
        y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block_c = triton.next_power_of_2(cols)
        block_r = max(1, _block_elems() // block_c)
        _kernel(_rms_norm_fwd_kernel)[(triton.cdiv(rows, block_r),)](
            x2, w, y, rstd, rows, cols, eps, BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=_warps(block_r * block_c))
        ctx.save_for_backward(x2, w, rstd)
        ctx.shape, ctx.weight_dtype = shape, weight.dtype
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        rows, cols = x2.shape
        dy2 = dy.reshape(-1, cols).contiguous()
        dx = torch.empty_like(x2)
        block_c = triton.next_power_of_2(cols)
        block_r = max(1, _block_elems() // block_c)
        # each program owns a run of row blocks and writes one partial weight gradient
        n_prog = _num_programs(x2, triton.cdiv(rows, block_r))
        rows_per_prog = triton.cdiv(triton.cdiv(rows, block_r), n_prog) * block_r
        dw_part = torch.empty(n_prog, cols, dtype=torch.float32, device=x2.device)
        _kernel(_rms_norm_bwd_kernel)[(n_prog,)](
            dy2, x2, w, rstd, dx, dw_part, rows, cols, rows_per_prog, BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=_warps(block_r * block_c))
        return dx.view(ctx.shape), dw_part.sum(0).to(ctx.weight_dtype), None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g, u = gate.contiguous(), up.contiguous()
        y = torch.empty(g.shape, dtype=torch.promote_types(g.dtype, u.dtype), device=g.device)
        n, block = g.numel(), _block_elems()
        _kernel(_swiglu_fwd_kernel)[(triton.cdiv(n, block),)](g, u, y, n, BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n, block = g.numel(), _block_elems()
        _kernel(_swiglu_bwd_kernel)[(triton.cdiv(n, block),)](
            dy, g, u, dg, du, n, BLOCK=block, num_warps=_warps(block))
        return dg, du


def _rotary_launch(x, cos, sin, out_dtype, backward):
    B, H, T, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    # cos/sin [T, D] or [B, T, D] (B may be 1): broadcast to [B, T, D] with stride 0 where shared
    cos = cos.contiguous().expand(B, T, D) if cos.dim() == 3 else cos.contiguous()[None].expand(B, T, D)
    sin = sin.contiguous().expand(B, T, D) if sin.dim() == 3 else sin.contiguous()[None].expand(B, T, D)
    y = torch.empty(B, H, T, D, dtype=out_dtype, device=x.device)
    block_d = triton.next_power_of_2(D // 2)
    block_t = max(1, _block_elems() // (2 * block_d))
    _kernel(_rotary_kernel)[(B * H, triton.cdiv(T, block_t))](
        x, cos, sin, y, H, T, D // 2, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
        y.stride(0), y.stride(1), y.stride(2), BACKWARD=backward, BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=_warps(block_t * block_d))
    return y


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return _rotary_launch(x, cos, sin, torch.promote_types(x.dtype, cos.dtype), backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        # the rotation is orthogonal: its gradient is the rotation by the opposite angle
        return _rotary_launch(dy, cos, sin, ctx.x_dtype, backward=True), None, None


def _ce_grad_triton(logits, labels, ignore_index):
    n, vocab = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    block = min(triton.next_power_of_2(vocab), _block_elems())
    _kernel(_ce_grad_kernel)[(n,)](logits, labels, loss, logits.stride(0), vocab, ignore_index,
                                   BLOCK_V=block, num_warps=_warps(block))
    return loss.sum()


# ---------------------------------------------------------------------------------------
# Triton kernels (plain functions, jitted by _kernel). Loads are upcast to fp32 at once:
# all arithmetic is fp32, and the interpreter gets bf16 arithmetic wrong.

if triton is not None:

    def _rms_norm_fwd_kernel(X, W, Y, RSTD, n_rows, n_cols, eps, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        # round to the input dtype before the weight multiply, as the reference does
        xn = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
        tl.store(Y + offs, (xn * w[None, :]).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=rows < n_rows)

    def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, n_rows, n_cols, rows_per_prog,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_C], dtype=tl.float32)
        for r in range(0, rows_per_prog, BLOCK_R):
            rows = pid * rows_per_prog + r + tl.arange(0, BLOCK_R)
            mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
            offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)
            xhat = x * rstd[:, None]
            dw += tl.sum(dy * xhat.to(X.dtype.element_ty).to(tl.float32), axis=0)
            dxhat = dy * w[None, :]
            # d/dx of x * rsqrt(mean(x^2) + eps): rstd * (dxhat - xhat * mean(dxhat * xhat))
            dx = rstd[:, None] * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=1) / n_cols)[:, None])
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW_PART + pid * n_cols + cols, dw, mask=cols < n_cols)

    def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        silu = (g * tl.sigmoid(g)).to(G.dtype.element_ty).to(tl.float32)
        tl.store(Y + offs, (silu * u).to(Y.dtype.element_ty), mask=mask)

    def _swiglu_bwd_kernel(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        tl.store(DG + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)

    def _rotary_kernel(X, COS, SIN, Y, H, T, HALF, sxb, sxh, sxt, scb, sct, syb, syh, syt,
                       BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        # y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2 (rotate_half form; halves of cos/sin may differ)
        bh = tl.program_id(0)
        b, h = bh // H, bh % H
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        mask = (t[:, None] < T) & (d[None, :] < HALF)
        xp = X + b.to(tl.int64) * sxb + h * sxh + t[:, None] * sxt + d[None, :]
        cs = b.to(tl.int64) * scb + t[:, None] * sct + d[None, :]
        x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
        c1 = tl.load(COS + cs, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(COS + cs + HALF, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + cs, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + cs + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # transpose of the forward map
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        yp = Y + b.to(tl.int64) * syb + h * syh + t[:, None] * syt + d[None, :]
        tl.store(yp, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(yp + HALF, y2.to(Y.dtype.element_ty), mask=mask)

    def _ce_grad_kernel(LOGITS, LABELS, LOSS, stride_row, V, ignore_index, BLOCK_V: tl.constexpr):
        # one row: online logsumexp over the vocabulary, then overwrite the logits with
        # softmax - onehot, or zeros when the label is ignored
        row = tl.program_id(0).to(tl.int64)
        ptr = LOGITS + row * stride_row
        y = tl.load(LABELS + row)
        valid = y != ignore_index
        m = float("-inf")
        s = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        y_safe = tl.where(valid, y, 0)
        target = tl.load(ptr + y_safe).to(tl.float32)
        tl.store(LOSS + row, tl.where(valid, lse - target, 0.0))
        keep = tl.where(valid, 1.0, 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(cols == y_safe, 1.0, 0.0)
            tl.store(ptr + cols, (g * keep).to(LOGITS.dtype.element_ty), mask=cols < V)
