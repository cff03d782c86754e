"""model.py against transformers' Qwen3 and hand-written references."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_qwen3
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

from model import EncoderDecoder, Qwen3, load_any, positions_from_mask
from model_components import build_mask, merged_attention
from model_config import ModelConfig, get_preset
from tokenizer import MODE_IDS



@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def random_ids(B, T, seed=0, high=151643):
    return torch.randint(0, high, (B, T), generator=torch.Generator().manual_seed(seed))


def pad_mask(B, T, side):
    mask = torch.ones(B, T, dtype=torch.long)
    if side == "left":
        mask[0, :3] = 0
        mask[1, :1] = 0
    elif side == "right":
        mask[0, -3:] = 0
        mask[1, -5:] = 0
    return mask


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_qwen3_logits_match_transformers(tmp_path, tie, padding):
    hf = make_hf_qwen3(str(tmp_path), tie=tie, rope_theta=31337.0)  # non-default theta
    ours = Qwen3.from_pretrained(str(tmp_path)).eval()
    assert ours.cfg.rope_theta == 31337.0 and ours.cfg.tie_embeddings == tie
    B, T = 2, 12
    ids, mask = random_ids(B, T), pad_mask(B, T, padding)
    pos = positions_from_mask(mask.bool(), T, ids.device)
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    got, _ = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max() <= 1e-4


def test_qwen3_left_padding_does_not_change_logits(hf_qwen3_dir):
    ours = Qwen3.from_pretrained(hf_qwen3_dir).eval()
    ids = random_ids(1, 9)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    a, _ = ours(ids)
    b, _ = ours(padded, attention_mask=mask)
    assert (a - b[:, 4:]).abs().max() < 1e-5


@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_roundtrip_through_transformers(tmp_path, tie):
    make_hf_qwen3(str(tmp_path / "src"), tie=tie, rope_theta=5000.0)
    ours = Qwen3.from_pretrained(str(tmp_path / "src")).eval()
    ours.save_pretrained(str(tmp_path / "export"))
    hf = Qwen3ForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    ids = random_ids(2, 10, seed=1)
    assert (hf(input_ids=ids).logits - ours(ids)[0]).abs().max() <= 1e-4
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path / "export"))


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf_qwen3(str(tmp_path / "a"))
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="2MB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    ours = Qwen3.from_pretrained(str(tmp_path / "sharded")).eval()
    ids = random_ids(1, 7)
    assert (hf(input_ids=ids).logits - ours(ids)[0]).abs().max() <= 1e-4


def test_encoder_equals_qwen3_model_without_causal_mask(hf_qwen3_dir):
    hf = Qwen3Model.from_pretrained(hf_qwen3_dir, attn_implementation="eager").eval()
    ed = EncoderDecoder.from_qwen3(hf_qwen3_dir).eval()
    ids = random_ids(2, 11, seed=3)
    visible = torch.zeros(2, 1, 11, 11)  # additive mask of zeros: every query sees every key
    ref = hf(input_ids=ids, attention_mask={"full_attention": visible}).last_hidden_state
    got = ed.encode(ids)
    assert (got - ref).abs().max() <= 1e-4
    # bidirectional: the last token reaches the first position; in the causal model it cannot
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 1000
    assert (ed.encode(changed)[:, 0] - got[:, 0]).abs().max() > 1e-4
    causal = Qwen3.from_pretrained(hf_qwen3_dir).eval()
    assert (causal.hidden(changed)[:, 0] - causal.hidden(ids)[:, 0]).abs().max() == 0


def reference_merged(q, k, v, enc_k, enc_v, enc_mask):
    """Scores over encoder and decoder keys softmaxed jointly, written out by hand (GQA by repetition)."""
    B, H, T, D = q.shape
    rep = H // k.shape[1]
    keys = torch.cat([enc_k, k], 2).repeat_interleave(rep, 1)
    vals = torch.cat([enc_v, v], 2).repeat_interleave(rep, 1)
    S = enc_k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        for i in range(T):
            allowed = [j for j in range(S) if enc_mask[b, j]] + [S + j for j in range(i + 1)]
            s = (q[b, :, i, None, :] * keys[b][:, allowed]).sum(-1) / D ** 0.5  # [H, n]
            out[b, :, i] = (s.softmax(-1)[..., None] * vals[b][:, allowed]).sum(1)
    return out


@pytest.mark.parametrize("enc_pad", [False, True])
def test_merged_attention_matches_hand_reference(enc_pad):
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, S, D = 2, 4, 2, 5, 6, 8
    q = torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    enc_k, enc_v = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    enc_mask = torch.ones(B, S, dtype=torch.bool)
    if enc_pad:
        enc_mask[0, -2:] = False
        enc_mask[1, -4:] = False
    ones = torch.ones(B, T, dtype=torch.long)

    def mask(t, T):  # the queries are the last t of T decoder keys; None when nothing is padded
        return build_mask(ones[:, T - t:T], ones[:, :T], True, enc_mask.long()) if enc_pad else None

    got = merged_attention(q, k, v, enc_k, enc_v, mask(T, T))
    assert (got - reference_merged(q, k, v, enc_k, enc_v, enc_mask)).abs().max() < 1e-5
    # newest query alone (as with a cache) sees everything
    last = merged_attention(q[:, :, -1:], k, v, enc_k, enc_v, mask(1, T))
    assert (last - got[:, :, -1:]).abs().max() < 1e-5
    # the middle two queries (a cache holding 3 keys, 2 new) use a lower-right causal mask
    mid = merged_attention(q[:, :, 2:4], k[:, :, :4], v[:, :, :4], enc_k, enc_v, mask(2, 4))
    assert (mid - got[:, :, 2:4]).abs().max() < 1e-5


def test_decoder_with_empty_encoder_is_causal_qwen3(hf_qwen3_dir):
    qwen = Qwen3.from_pretrained(hf_qwen3_dir).eval()
    ed = EncoderDecoder.from_qwen3(hf_qwen3_dir).eval()
    ids = random_ids(2, 9, seed=5)
    empty = torch.zeros(2, 0, ed.cfg.hidden_size)
    got = ed.decode(ids, empty, torch.zeros(2, 0, dtype=torch.bool))
    ref, _ = qwen(ids)
    keep = torch.ones(ref.shape[-1], dtype=torch.bool)
    keep[list(MODE_IDS.values())] = False  # from_qwen3 re-initialises the never-used mode-token rows
    assert got.shape[-1] == ref.shape[-1] + 100
    assert (got[..., :ref.shape[-1]][..., keep] - ref[..., keep]).abs().max() <= 1e-5


def tiny_encdec(seed=0, enc_rope="none"):
    torch.manual_seed(seed)
    return EncoderDecoder(get_preset("tiny_encdec", enc_rope=enc_rope)).eval()


@pytest.mark.parametrize("enc_rope", ["none", "prefix"])
def test_cached_decoding_matches_full_forward(enc_rope):
    model = tiny_encdec(enc_rope=enc_rope)
    enc = random_ids(2, 7, seed=1)
    enc_mask = torch.ones(2, 7, dtype=torch.bool)
    enc_mask[1, -3:] = False
    dec = random_ids(2, 6, seed=2)
    full, _ = model(enc, enc_mask, dec)
    enc_out = model.encode(enc, enc_mask)
    cache = model.new_cache()
    step0 = model.decode(dec[:, :2], enc_out, enc_mask, cache)  # a prompt of two, then one at a time
    assert (step0 - full[:, :2]).abs().max() < 1e-5
    for t in range(2, 6):
        step = model.decode(dec[:, t:t + 1], None, enc_mask, cache)
        assert (step[:, 0] - full[:, t]).abs().max() < 1e-5


def test_loss_equals_full_logits_cross_entropy():
    model = tiny_encdec()
    enc, dec = random_ids(2, 7), random_ids(2, 5, seed=1)
    labels = dec.clone()
    labels[1, -2:] = -100
    logits, _ = model(enc, None, dec)
    _, loss = model(enc, None, dec, labels=labels)
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert abs(loss.item() - ref.item()) < 1e-5


def test_encdec_checkpoint_roundtrip(tmp_path):
    model = tiny_encdec()
    model.save_pretrained(str(tmp_path))
    again = load_any(str(tmp_path))
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    assert json.load(open(tmp_path / "config.json"))["model_type"] == "qwen3_encdec"
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "config.json"}


def test_from_qwen3_copies_layers_and_grows_vocab(hf_qwen3_dir):
    qwen = Qwen3.from_pretrained(hf_qwen3_dir)
    ed = EncoderDecoder.from_qwen3(hf_qwen3_dir, num_sentinels=100)
    assert ed.embed.weight.shape[0] == 151936 + 100
    assert torch.equal(ed.embed.weight[:151669], qwen.embed.weight[:151669])
    w = qwen.decoder.layers[1].attn.k_proj.weight
    assert torch.equal(ed.encoder.layers[1].attn.k_proj.weight, w)
    assert torch.equal(ed.decoder.layers[1].attn.k_proj.weight, w)
    assert ed.encoder.layers[1].attn.k_proj.weight.data_ptr() != ed.decoder.layers[1].attn.k_proj.weight.data_ptr()
    new = ed.embed.weight[151936:]
    assert (new - qwen.embed.weight[:151643].mean(0)).abs().mean() < new.abs().mean()  # near the mean row
    assert len({tuple(r.tolist()) for r in new[:5]}) == 5  # distinct from each other


def test_param_counts_match_transformers():
    cfg = get_preset("qwen3_0.6b")
    hf_cfg = Qwen3Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                         head_dim=cfg.head_dim, tie_word_embeddings=True)
    with torch.device("meta"):
        hf = Qwen3ForCausalLM(hf_cfg)
        ours = Qwen3(cfg)
    hf_total = sum(p.numel() for p in hf.parameters())  # parameters() counts the tied matrix once
    counts = cfg.num_params()
    assert counts["total"] == hf_total == sum(p.numel() for p in ours.parameters())
    assert counts["non_embedding"] == hf_total - cfg.vocab_size * cfg.hidden_size
    ed_cfg = get_preset("qwen3_encdec_0.6b")
    with torch.device("meta"):
        ed = EncoderDecoder(ed_cfg)
    assert ed_cfg.num_params()["total"] == sum(p.numel() for p in ed.parameters())


def test_config_reads_hf_and_rejects_bad_shapes(hf_qwen3_dir, tmp_path):
    cfg = ModelConfig.from_hf(hf_qwen3_dir)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (64, 2, 4, 2)
    d = json.load(open(os.path.join(hf_qwen3_dir, "config.json")))
    old = {k: v for k, v in d.items() if k != "rope_parameters"}
    old["rope_theta"] = 777.0  # pre-5.x layout
    assert ModelConfig.from_hf(old).rope_theta == 777.0
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(num_heads=16, num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("qwen3_7b")
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_hf(str(tmp_path))


def test_flops_per_token_scales_like_6n():
    cfg = get_preset("qwen3_0.6b")
    n = cfg.num_params()["non_embedding"] + cfg.vocab_size * cfg.hidden_size  # head matmul counts
    per_token = cfg.flops_per_token(0, 1)
    assert 6 * n <= per_token < 6 * n * 1.01


# ---------------------------------------------------------------------------------------
# packed rows, positions of encoder keys, masks built once

def packed_batch(rows=3, enc_len=64, dec_len=48, seed=0):
    from ul2 import UL2
    ul2 = UL2(enc_len, dec_len)
    windows = torch.randint(0, 151643, (rows, enc_len + dec_len), generator=torch.Generator().manual_seed(seed))
    b = ul2.make_packed(windows.numpy(), 0, range(rows))
    assert b["enc_seg"].max(1).min() >= 2  # every row holds several examples
    return {k: torch.from_numpy(v) for k, v in b.items()}


def segment(b, row, k):
    e, d = b["enc_seg"][row] == k, b["dec_seg"][row] == k
    return b["enc_ids"][row][e][None], b["dec_ids"][row][d][None], b["labels"][row][d][None], d


@pytest.mark.parametrize("enc_rope", ["none", "prefix"])
def test_packed_rows_equal_their_examples_one_by_one(enc_rope):
    """Each example of a packed row sees only itself: the packed loss is the token-weighted mean of the
    examples' own losses, and the packed logits are each example's logits run alone (fp32)."""
    model, b = tiny_encdec(enc_rope=enc_rope), packed_batch()
    logits, _ = model(b["enc_ids"], None, b["dec_ids"], enc_seg=b["enc_seg"], dec_seg=b["dec_seg"])
    _, packed_sum = model(b["enc_ids"], None, b["dec_ids"], labels=b["labels"], enc_seg=b["enc_seg"],
                          dec_seg=b["dec_seg"], reduction="sum")
    _, packed_mean = model(b["enc_ids"], None, b["dec_ids"], labels=b["labels"], enc_seg=b["enc_seg"],
                           dec_seg=b["dec_seg"])
    sums, count = 0.0, 0
    for row in range(len(b["enc_ids"])):
        for k in range(1, int(b["enc_seg"][row].max()) + 1):
            enc, dec, labels, where = segment(b, row, k)
            alone, _ = model(enc, None, dec)
            assert (alone[0] - logits[row][where]).abs().max() < 1e-5
            _, loss = model(enc, None, dec, labels=labels, reduction="sum")
            sums, count = sums + loss.item(), count + int((labels != -100).sum())
    assert abs(packed_sum.item() - sums) <= 1e-5 * count
    assert abs(packed_mean.item() - sums / count) <= 1e-5


def test_perturbing_one_segment_never_changes_another():
    model, b = tiny_encdec(), packed_batch(rows=2)
    logits, _ = model(b["enc_ids"], None, b["dec_ids"], enc_seg=b["enc_seg"], dec_seg=b["dec_seg"])
    other = {k: v.clone() for k, v in b.items()}
    hit = other["enc_seg"][0] == 2
    other["enc_ids"][0][hit] = (other["enc_ids"][0][hit] + 17) % 151643
    hit_dec = (other["dec_seg"][0] == 2) & (other["dec_ids"][0] < 151643)
    other["dec_ids"][0][hit_dec] = (other["dec_ids"][0][hit_dec] + 5) % 151643
    changed, _ = model(other["enc_ids"], None, other["dec_ids"], enc_seg=other["enc_seg"], dec_seg=other["dec_seg"])
    seg = b["dec_seg"][0]
    assert torch.equal(changed[0][seg != 2], logits[0][seg != 2])  # every other segment, bit for bit
    assert torch.equal(changed[1], logits[1])
    assert (changed[0][seg == 2] - logits[0][seg == 2]).abs().max() > 1e-3


def test_prefix_positions_rotate_encoder_keys_as_a_prefix_lm(hf_qwen3_dir):
    """enc_rope='prefix': an encoder-decoder whose encoder is the causal Qwen3 itself would see exactly
    what Qwen3 sees reading [encoder ; decoder] as one sequence. Check the position arithmetic directly:
    with the encoder stack swapped for identity-like states, the decoder's scores against the encoder keys
    equal Qwen3's at positions 0..S-1 and S.. for the decoder."""
    from model_components import Rotary
    cfg = get_preset("tiny_encdec", enc_rope="prefix")
    model = EncoderDecoder(cfg).eval()
    enc = random_ids(1, 5, seed=3)
    dec = random_ids(1, 4, seed=4)
    enc_out = model.encode(enc)
    # the reference: one causal pass of the decoder stack over [encoder states ; decoder embeddings] where
    # the first S rows are frozen to the encoder states in every layer is exactly merged attention with
    # prefix positions; rebuild it by hand for the first layer's attention
    blk = model.decoder.layers[0].attn
    x = model.decoder.layers[0].attn_norm(model.embed(dec))
    rot = Rotary(cfg.head_dim, cfg.rope_theta)
    S, T = 5, 4
    q = blk.q_norm(blk.q_proj(x).view(1, T, blk.n_head, blk.hd)).transpose(1, 2)
    k, v = blk.project_kv(x)
    ek, ev = blk.project_kv(enc_out)
    cos_d, sin_d = rot(torch.arange(S, S + T), q.dtype)
    cos_e, sin_e = rot(torch.arange(S), q.dtype)
    from kernels import apply_rotary_ref
    q, k, ek = apply_rotary_ref(q, cos_d, sin_d), apply_rotary_ref(k, cos_d, sin_d), apply_rotary_ref(ek, cos_e, sin_e)
    keys, values = torch.cat([ek, k], 2).repeat_interleave(2, 1), torch.cat([ev, v], 2).repeat_interleave(2, 1)
    scores = q @ keys.transpose(-1, -2) / blk.hd ** 0.5
    scores = scores.masked_fill(~torch.ones(T, S + T, dtype=torch.bool).tril(S), float("-inf"))
    want = blk.o_proj((scores.softmax(-1) @ values).transpose(1, 2).reshape(1, T, -1))
    got = {}
    hook = blk.register_forward_hook(lambda m, i, o: got.setdefault("y", o))
    model.decoder_hidden(dec, enc_out)
    hook.remove()
    assert (got["y"] - want).abs().max() < 1e-5


def test_head_matmuls_run_in_bf16_under_autocast():
    """CPU bf16 autocast: every matrix multiply of the loss (logits, d hidden, d weight) is dispatched in
    bf16, the loss stays within bf16 tolerance of fp32, and the embedding's gradient comes back fp32."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Spy(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("mm", "addmm", "bmm", "matmul", "linear", "addmm_"):
                self.calls.append((name, [a.dtype for a in args if isinstance(a, torch.Tensor)]))
            return func(*args, **(kwargs or {}))

    import kernels
    torch.set_grad_enabled(True)  # this file's no_grad fixture restores its own state afterwards
    model = tiny_encdec()
    model.train()
    b = packed_batch(rows=2)
    with torch.no_grad():
        _, ref = model(b["enc_ids"], None, b["dec_ids"], labels=b["labels"], enc_seg=b["enc_seg"], dec_seg=b["dec_seg"])
    h = model.decoder_hidden(b["dec_ids"], model.encode(b["enc_ids"], enc_seg=b["enc_seg"]), enc_seg=b["enc_seg"],
                             dec_seg=b["dec_seg"]).detach().requires_grad_()
    spy = Spy()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with spy:
            loss = kernels.linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.embed.weight,
                                                b["labels"].reshape(-1))
            loss.backward()
    assert len(spy.calls) >= 3, spy.calls
    assert all(dt == torch.bfloat16 for _, dts in spy.calls for dt in dts), spy.calls
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 2e-2 * ref.item()
    assert model.embed.weight.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    # and the whole model under autocast trains with a bf16-close loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(b["enc_ids"], None, b["dec_ids"], labels=b["labels"], enc_seg=b["enc_seg"],
                        dec_seg=b["dec_seg"])
    assert abs(loss.item() - ref.item()) < 2e-2 * ref.item()


@pytest.mark.parametrize("packed", [False, True])
def test_blocks_compile_without_graph_breaks(packed):
    """The mask is built once per forward outside the blocks, so an encoder and a decoder block trace into
    one graph each (no host sync, no data-dependent branch inside)."""
    import torch._dynamo
    from model_components import build_mask
    model = tiny_encdec()
    B, S, T = 2, 12, 9
    if packed:
        enc_seg = torch.tensor([[1] * 5 + [2] * 6 + [0], [1] * 12])
        dec_seg = torch.tensor([[1] * 4 + [2] * 4 + [0], [1] * 9])
    else:  # padding only
        enc_seg = torch.tensor([[1] * 9 + [0] * 3, [1] * 12])
        dec_seg = torch.ones(B, T, dtype=torch.long)
    x_enc, x_dec = torch.randn(B, S, 64), torch.randn(B, T, 64)
    cos, sin = model.rotary(torch.arange(S), torch.float32)
    enc_mask = build_mask(enc_seg, enc_seg, False)
    dec_mask = build_mask(dec_seg, dec_seg, True, enc_seg)
    torch._dynamo.reset()
    enc = torch._dynamo.explain(model.encoder.layers[0])(x_enc, cos, sin, "bidirectional", enc_mask)
    assert enc.graph_break_count == 0 and enc.graph_count == 1, enc.break_reasons
    cos, sin = model.rotary(torch.arange(T), torch.float32)
    dec = torch._dynamo.explain(model.decoder.layers[0])(x_dec, cos, sin, "merged", dec_mask, x_enc)
    assert dec.graph_break_count == 0 and dec.graph_count == 1, dec.break_reasons


def test_flex_attention_backend_equals_sdpa():
    """The CUDA path (flex_attention with a BlockMask from the same rule) gives the SDPA path's outputs;
    on CPU it runs flex_attention eagerly."""
    import model_components
    model, b = tiny_encdec(), packed_batch(rows=2)
    ref, _ = model(b["enc_ids"], None, b["dec_ids"], enc_seg=b["enc_seg"], dec_seg=b["dec_seg"])
    model_components.set_attention_backend("flex")
    try:
        got, _ = model(b["enc_ids"], None, b["dec_ids"], enc_seg=b["enc_seg"], dec_seg=b["dec_seg"])
    finally:
        model_components.set_attention_backend("auto")
    real = b["dec_seg"] > 0
    assert (got[real] - ref[real]).abs().max() < 1e-4
