"""Fused kernels and their torch references.

Every op here has a plain torch version, which is both the reference the tests compare
against and the fallback used on CPU. The Triton versions run only when switched on
with `use_triton(True)` and the tensors live on CUDA (or TRITON_INTERPRET=1 is set).
"""
import torch
import torch.nn.functional as F

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


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of (hidden @ weight.T) without holding the [N, V] logits.

    The gradients are computed chunk by chunk in the forward pass (the loss is the last
    op of the graph, so its incoming gradient is a scalar applied in backward)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size):
        n = hidden.shape[0]
        valid = labels != ignore_index
        n_valid = int(valid.sum())
        scale = 1.0 / max(n_valid, 1)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if weight.requires_grad else None
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size]
            y = labels[start:start + chunk_size]
            ok = y != ignore_index
            if not bool(ok.any()):
                continue
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            y_safe = torch.where(ok, y, torch.zeros_like(y))
            target = logits.gather(1, y_safe[:, None]).squeeze(1)
            loss += ((lse - target) * ok).sum()
            # d loss / d logits = softmax - onehot, zero on ignored rows
            grad = torch.exp(logits - lse[:, None])
            grad[torch.arange(len(y), device=y.device), y_safe] -= 1.0
            grad *= (ok.float() * scale)[:, None]
            grad = grad.to(hidden.dtype)
            grad_hidden[start:start + chunk_size] = grad @ weight
            if grad_weight is not None:
                grad_weight += (grad.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.has_gw = grad_weight is not None
        return loss * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_out.to(grad_hidden.dtype)
        gw = (grad_weight * grad_out).to(ctx.saved_tensors[0].dtype) if ctx.has_gw else None
        return gh, gw, None, None, None


def linear_cross_entropy_ref(hidden, weight, labels, ignore_index=-100, chunk_size=1024):
    """Mean cross-entropy over labels != ignore_index; 0 when every label is ignored."""
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk_size)


# ---------------------------------------------------------------------------------------
# dispatch: the model calls these

def _triton_ok(x):
    return False  # Triton kernels arrive with the kernels issue


def rms_norm(x, weight, eps):
    return rms_norm_ref(x, weight, eps)


def swiglu(gate, up):
    return swiglu_ref(gate, up)


def apply_rotary(x, cos, sin):
    return apply_rotary_ref(x, cos, sin)


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, chunk_size=1024):
    return linear_cross_entropy_ref(hidden, weight, labels, ignore_index, chunk_size)
