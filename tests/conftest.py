"""Shared test fixtures: the shared data directory and tiny random Hugging Face Qwen3 checkpoints."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _import_triton_for_interpreter():
    """Triton picks interpreter or GPU mode at its first import, and importing transformers' models imports it.
    Import it in interpreter mode first, then restore the environment: kernels.py only takes the Triton path on
    CPU while TRITON_INTERPRET=1 is set (tests/test_kernels.py sets it per test), so other tests run torch code."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:
        pass
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


_import_triton_for_interpreter()


def shared_data_dir():
    return os.environ.get("QWEN_ENCDEC_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))


@pytest.fixture
def shared_data():
    path = shared_data_dir()
    if not os.path.isdir(path):
        pytest.skip(f"shared data not found at {path} (set QWEN_ENCDEC_SHARED_DATA)")
    return path


def make_hf_qwen3(out_dir, tie=True, rope_theta=10000.0, vocab_size=151936, hidden=64, layers=2, seed=0):
    """A tiny random transformers Qwen3ForCausalLM saved with save_pretrained: our stand-in checkpoint."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden + 32,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                      tie_word_embeddings=tie, max_position_embeddings=512, rms_norm_eps=1e-6)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random norm weights, so a wrong norm placement shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="session")
def hf_qwen3_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf_qwen3"))
    make_hf_qwen3(path)
    return path
