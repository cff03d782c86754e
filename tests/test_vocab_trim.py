"""vocab_trim.py: the trimmed model computes what the full model computes on the kept rows."""
import types

import numpy as np
import torch

from model import EncoderDecoder
from model_config import get_preset
from tokenizer import MODE_IDS, SENTINEL_START
from vocab_trim import VocabTrim, objective_ids, used_ids


def test_used_ids_are_the_corpus_plus_objective_ids():
    rng = np.random.default_rng(0)
    shard_a = rng.integers(0, 151643, 5000).astype(np.uint32)
    shard_b = np.array([7, 7, 151643, 42], dtype=np.uint32)
    ds = types.SimpleNamespace(shards=[shard_a, shard_b])
    kept = used_ids([ds], 152036, objective_ids(encoder_decoder=True))
    expected = np.union1d(np.unique(np.concatenate([shard_a, shard_b])),
                          [MODE_IDS["R"], MODE_IDS["X"], MODE_IDS["S"]] + list(range(SENTINEL_START, 152036)))
    assert np.array_equal(kept, expected)


def test_trimmed_model_matches_full_model_on_kept_columns():
    torch.manual_seed(0)
    model = EncoderDecoder(get_preset("tiny_encdec")).eval()
    kept = np.sort(np.random.default_rng(1).choice(152036, 300, replace=False))
    trim = VocabTrim(kept, 152036)
    enc_full = torch.as_tensor(kept[np.random.default_rng(2).integers(0, 300, (2, 9))])
    dec_full = torch.as_tensor(kept[np.random.default_rng(3).integers(0, 300, (2, 5))])
    with torch.no_grad():
        full_logits, _ = model(enc_full, None, dec_full)
        trim.shrink(model)
        enc = torch.as_tensor(trim.to_compact(enc_full.numpy()))
        dec = torch.as_tensor(trim.to_compact(dec_full.numpy()))
        assert torch.equal(torch.as_tensor(kept)[enc], enc_full)
        small_logits, _ = model(enc, None, dec)
    assert small_logits.shape[-1] == 300
    assert (small_logits - full_logits[..., kept]).abs().max() < 1e-5
    labels = np.array([[5, -100, 3]])
    assert np.array_equal(trim.to_compact(np.where(labels >= 0, kept[np.maximum(labels, 0)], labels)), labels)


def test_expand_state_scatters_trained_rows_back():
    torch.manual_seed(0)
    model = EncoderDecoder(get_preset("tiny_encdec"))
    original = model.embed.weight.detach().clone()
    kept = np.array([0, 5, 151643, 152035])
    trim = VocabTrim(kept, 152036)
    trim.shrink(model)
    with torch.no_grad():
        model.embed.weight += 1.0  # "training"
    full = trim.expand_state(model.state_dict())["embed.weight"]
    assert full.shape == original.shape
    assert torch.equal(full[kept], original[kept] + 1.0)
    others = torch.ones(152036, dtype=torch.bool)
    others[kept] = False
    assert torch.equal(full[others], original[others])
    again = VocabTrim(kept, 152036).shrink_state({"embed.weight": full})
    assert torch.equal(again["embed.weight"], original[kept] + 1.0)
