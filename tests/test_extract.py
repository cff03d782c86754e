"""extract.py: a tiny extracted encoder gives the same embeddings through this project, transformers and
sentence-transformers, matches the training model it came from, ignores padding, and checkpoint averaging
is the element-wise mean."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval_embed  # noqa: E402
import extract  # noqa: E402
import model as M  # noqa: E402
import tokenizer as tok  # noqa: E402
from model_config import get_preset  # noqa: E402

TEXTS = ["A man is playing a guitar.", "x", "你好，世界！ Two scripts in one line.",
         "A considerably longer sentence, so that the short ones above get plenty of padding in a batch."]


def random_encdec(seed):
    torch.manual_seed(seed)
    m = M.EncoderDecoder(get_preset("tiny_encdec"))
    with torch.no_grad():  # norms away from 1 so a lost norm weight would show
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A training out_dir with three checkpoints (and a partial .tmp one), extracted averaging the last two."""
    root = tmp_path_factory.mktemp("extract")
    out_dir = root / "run"
    models = [random_encdec(seed) for seed in range(3)]
    for it, m in zip((100, 200, 300), models):
        m.save_pretrained(str(out_dir / f"ckpt-{it:07d}"))
    (out_dir / "ckpt-0000400.tmp").mkdir()  # an interrupted save: never read
    enc = root / "encoder"
    extract.main(["--ckpt", str(out_dir), "--out", str(enc), "--average_last", "2"])
    return {"out_dir": out_dir, "enc": str(enc), "models": models}


def test_average_is_elementwise_mean(run):
    from safetensors.torch import load_file
    saved = load_file(os.path.join(run["enc"], "model.safetensors"))
    sd1, sd2 = run["models"][1].state_dict(), run["models"][2].state_dict()
    want = {k for k in sd1 if k == "embed.weight" or k.startswith("encoder.")}
    assert set(saved) == want  # the decoder is left behind
    for k in want:
        torch.testing.assert_close(saved[k], torch.stack([sd1[k], sd2[k]]).mean(0), rtol=0, atol=1e-7)
    cfg = json.load(open(os.path.join(run["enc"], "config.json")))
    assert [os.path.basename(p) for p in cfg["extracted_from"]] == ["ckpt-0000200", "ckpt-0000300"]


def test_average_of_one_checkpoint_is_that_checkpoint(run):
    paths = extract.resolve_checkpoints(str(run["out_dir"]), 1)
    assert [os.path.basename(p) for p in paths] == ["ckpt-0000300"]
    _, sd = extract.average_checkpoints(paths)
    for k, v in sd.items():
        assert torch.equal(v, run["models"][2].state_dict()[k])


def test_three_loaders_agree_and_match_the_training_model(run):
    embs = extract.embed_three_ways(run["enc"], TEXTS)
    ref = embs["project"]
    for name in ("transformers", "sentence-transformers"):
        assert np.abs(embs[name] - ref).max() <= 1e-5, name
    # independent reference: the averaged EncoderDecoder's own encode(), mean-pooled and normalised by hand
    m = random_encdec(0)
    sd1, sd2 = run["models"][1].state_dict(), run["models"][2].state_dict()
    m.load_state_dict({k: (sd1[k] + sd2[k]) / 2 for k in sd1})
    t = tok.load_tokenizer()
    for i, text in enumerate(TEXTS):
        ids = torch.tensor([t.encode(text)])
        with torch.no_grad():
            h = m.encode(ids, torch.ones_like(ids, dtype=torch.bool))[0].mean(0)
        np.testing.assert_allclose(ref[i], torch.nn.functional.normalize(h, dim=0).numpy(), atol=1e-5)


def test_cls_and_last_pooling_agree(run):
    from transformers import AutoModel, AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(run["enc"], trust_remote_code=True)
    batch = hf_tok(TEXTS, padding=True, return_tensors="pt")
    for pooling in ("cls", "last"):
        ours = eval_embed.Encoder.from_pretrained(run["enc"], pooling=pooling).encode(TEXTS)
        hf = AutoModel.from_pretrained(run["enc"], trust_remote_code=True, pooling=pooling)
        with torch.no_grad():
            theirs = hf(**batch).pooler_output.numpy()
        assert np.abs(ours - theirs).max() <= 1e-5, pooling
        assert np.abs(ours - eval_embed.Encoder.from_pretrained(run["enc"]).encode(TEXTS)).max() > 1e-3


def test_padding_does_not_change_an_embedding(run):
    from transformers import AutoModel, AutoTokenizer
    enc = eval_embed.Encoder.from_pretrained(run["enc"])
    alone = np.concatenate([enc.encode([t]) for t in TEXTS])
    np.testing.assert_allclose(enc.encode(TEXTS), alone, atol=1e-5)  # padded in one batch
    hf = AutoModel.from_pretrained(run["enc"], trust_remote_code=True)
    hf_tok = AutoTokenizer.from_pretrained(run["enc"], trust_remote_code=True)
    assert hf_tok.padding_side == "right"
    for side in ("right", "left"):
        hf_tok.padding_side = side
        batch = hf_tok(TEXTS, padding=True, return_tensors="pt")
        assert int((batch["attention_mask"] == 0).sum()) > 10
        with torch.no_grad():
            out = hf(**batch).pooler_output.numpy()
        np.testing.assert_allclose(out, alone, atol=1e-5, err_msg=f"{side} padding")


def test_eval_embed_loads_the_directory(run):
    assert eval_embed.guess_kind(run["enc"]) == "ours"
    model = eval_embed.load_model(run["enc"])
    assert isinstance(model, eval_embed.Encoder) and model.pooling == "mean" and model.max_len == 512
    np.testing.assert_allclose(model.encode(TEXTS), eval_embed.Encoder.from_pretrained(run["enc"]).encode(TEXTS))


def test_checkpoint_kind_matches_extracted(run):
    # a raw training checkpoint evaluated directly embeds like its extracted encoder
    ckpt = str(run["out_dir"] / "ckpt-0000300")
    assert eval_embed.guess_kind(ckpt) == "ckpt"
    direct = eval_embed.load_model(ckpt).encode(TEXTS)
    m = run["models"][2]
    t = tok.load_tokenizer()
    with torch.no_grad():
        h = m.encode(torch.tensor([t.encode(TEXTS[0])]))[0].mean(0)
    np.testing.assert_allclose(direct[0], torch.nn.functional.normalize(h, dim=0).numpy(), atol=1e-5)


def test_bad_input_fails_cleanly(run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        extract.main(["--ckpt", str(run["out_dir"]), "--out", str(tmp_path / "e"), "--average_last", "4"])
    assert "only 3 complete checkpoints" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "e") and not os.path.exists(tmp_path / "e.tmp")
    with pytest.raises(SystemExit):
        extract.main(["--ckpt", run["enc"], "--out", str(tmp_path / "e")])
    assert "neither" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        extract.main(["--ckpt", str(run["out_dir"]), "--out", run["enc"]])
    assert "--force" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_verify_catches_a_broken_modeling_file(run, tmp_path):
    enc = str(tmp_path / "enc")
    extract.main(["--ckpt", str(run["out_dir"] / "ckpt-0000100"), "--out", enc, "--pooling", "last", "--verify"])
    broken = str(tmp_path / "broken")
    shutil.copytree(enc, broken)
    src = open(os.path.join(broken, "hf_encoder.py")).read()
    open(os.path.join(broken, "hf_encoder.py"), "w").write(src.replace("x = self.encoder.norm(x)", "pass"))
    with pytest.raises(ValueError, match="disagree"):
        extract.verify(broken)


def test_contrastive_starts_from_an_extracted_directory(run):
    import contrastive
    m = contrastive.load_start(run["enc"]).eval()
    ref = random_encdec(0)
    sd1, sd2 = run["models"][1].state_dict(), run["models"][2].state_dict()
    ref.load_state_dict({k: (sd1[k] + sd2[k]) / 2 for k in sd1})
    ids = torch.tensor([[9707, 1879, 11, 1879, 0], [9707, 1879, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        got, want = m.hidden(ids, mask, attn="bidirectional"), ref.encode(ids, mask)
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------
# a contrastive run's checkpoint (a Hugging Face Qwen3 directory + trainer_state.json) exported

def contrastive_checkpoint(root, **overrides):
    """A tiny Qwen3 holding every row of the tokenizer, trained a few contrastive steps, saved as train.py
    saves a contrastive run: Qwen3.save_pretrained + trainer_state.json with the run's config (as the
    objective left it: contrastive_mode_token resolved)."""
    import contrastive
    from types import SimpleNamespace
    data = root / "pairs.tsv"
    data.write_text("anchor\tpositive\n" + "".join(f"item {i} is red\tthe {i}th thing is red\n" for i in range(16)))
    cfg = get_preset("tiny", vocab_size=tok.VOCAB_SIZE)
    run_cfg = {**contrastive.CONFIG, "objective": "contrastive", "contrastive_data": str(data),
               "contrastive_pooling": "last", "contrastive_query_prefix": "query: ",
               "contrastive_doc_prefix": "passage: ", "contrastive_matryoshka_dims": [64, 32, 16], "seed": 0,
               **overrides}
    ns = SimpleNamespace(**run_cfg)
    obj = contrastive.Objective(ns, cfg)
    torch.manual_seed(0)
    m = M.Qwen3(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    for step in range(3):
        loss, n = obj.loss(m, {k: torch.from_numpy(v) for k, v in obj.train_batch(step, step * 8, 8).items()})
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    ckpt = root / "crun" / "ckpt-0000003"
    m.save_pretrained(str(ckpt))
    (ckpt / "trainer_state.json").write_text(json.dumps({"iter": 3, "config": vars(ns)}))
    from safetensors.torch import save_file
    save_file({"rng.torch.0": torch.get_rng_state()}, str(ckpt / "trainer_state.safetensors"))
    return m.eval(), str(root / "crun")


def test_contrastive_export_loads_identically_three_ways_at_every_width(tmp_path):
    m, out_dir = contrastive_checkpoint(tmp_path)
    enc = str(tmp_path / "cenc")
    extract.main(["--ckpt", out_dir, "--out", enc])  # pooling, prompts and widths from the run
    cfg = json.load(open(os.path.join(enc, "config.json")))
    assert cfg["pooling"] == "last" and cfg["matryoshka_dims"] == [32, 16]
    assert cfg["prompts"] == {"query": "query: ", "document": "passage: "}
    st_cfg = json.load(open(os.path.join(enc, "config_sentence_transformers.json")))
    assert st_cfg["prompts"] == cfg["prompts"]
    assert eval_embed.guess_kind(out_dir + "/ckpt-0000003") == "bidir"
    loaders = extract.three_loaders(enc)
    t = tok.load_tokenizer()
    for dim in (None, 32, 16):
        for prompt_name, prompt in ((None, ""), ("query", "query: ")):
            embs = extract.embed_three_ways(enc, TEXTS, truncate_dim=dim, prompt_name=prompt_name, loaders=loaders)
            ref = embs["project"]
            assert ref.shape == (len(TEXTS), dim or 64)
            np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1.0, atol=1e-5)
            for name in ("transformers", "sentence-transformers"):
                assert np.abs(embs[name] - ref).max() <= 1e-5, (name, dim, prompt_name)
            # independent reference: the trained Qwen3 itself, bidirectional, last token, cut, normalised
            for i, text in enumerate(TEXTS):
                ids = torch.tensor([t.encode(prompt + text)])
                with torch.no_grad():
                    h = m.hidden(ids, attn="bidirectional")[0, -1][:dim or 64]
                np.testing.assert_allclose(ref[i], torch.nn.functional.normalize(h, dim=0).numpy(), atol=1e-5)
    # sentence-transformers without normalize_embeddings: the prefix of the full unit vector, same cosines
    ours_full = extract.embed_three_ways(enc, TEXTS, loaders=loaders)["project"]
    st16 = loaders[2].encode(TEXTS, truncate_dim=16)
    np.testing.assert_allclose(st16, ours_full[:, :16], atol=1e-5)
    # eval_embed reads the training checkpoint directly, as the exported directory
    direct = eval_embed.load_model(out_dir + "/ckpt-0000003")
    assert direct.pooling == "last" and direct.prompts == cfg["prompts"]
    np.testing.assert_allclose(direct.encode(TEXTS, prompt="query: "),
                               eval_embed.Encoder.from_pretrained(enc).encode(TEXTS, prompt="query: "), atol=1e-5)


def test_mode_token_is_the_default_prompt_in_every_loader(tmp_path):
    """A run trained with contrastive_mode_token='<|ul2_S|>' exports it as the 'default' prompt: this project and
    sentence-transformers (default_prompt_name) put it before every text given no prompt, transformers is given
    it; the query / document prompts hold it too. All equal the trained Qwen3's states of id 151671 + text."""
    S = "<|ul2_S|>"
    m, out_dir = contrastive_checkpoint(tmp_path, contrastive_mode_token=S)
    enc = str(tmp_path / "cenc")
    extract.main(["--ckpt", out_dir, "--out", enc, "--verify"])  # the three loaders, default / query / document
    cfg = json.load(open(os.path.join(enc, "config.json")))
    assert cfg["prompts"] == {"default": S, "query": S + "query: ", "document": S + "passage: "}
    st_cfg = json.load(open(os.path.join(enc, "config_sentence_transformers.json")))
    assert st_cfg["prompts"] == cfg["prompts"] and st_cfg["default_prompt_name"] == "default"
    loaders = extract.three_loaders(enc)
    assert loaders[1][0](S + "A man.")["input_ids"][0] == tok.MODE_IDS["S"]  # one token in transformers too
    t = tok.load_tokenizer()
    for dim in (None, 16):
        for prompt_name, prompt in ((None, S), ("query", S + "query: "), ("document", S + "passage: ")):
            embs = extract.embed_three_ways(enc, TEXTS, truncate_dim=dim, prompt_name=prompt_name, loaders=loaders)
            ref = embs["project"]
            for name in ("transformers", "sentence-transformers"):
                assert np.abs(embs[name] - ref).max() <= 1e-5, (name, dim, prompt_name)
            for i, text in enumerate(TEXTS):
                ids = torch.tensor([t.encode(prompt + text)])
                assert ids[0, 0] == tok.MODE_IDS["S"]
                with torch.no_grad():
                    h = m.hidden(ids, attn="bidirectional")[0, -1][:dim or 64]
                np.testing.assert_allclose(ref[i], torch.nn.functional.normalize(h, dim=0).numpy(), atol=1e-5)
    ours = eval_embed.Encoder.from_pretrained(enc)
    plain = ours.encode(TEXTS, prompt="")  # '' asks for no prompt at all
    assert np.abs(ours.encode(TEXTS) - plain).max() > 1e-3
    assert np.abs(loaders[2].encode(TEXTS, prompt="") - plain).max() <= 1e-5
    # STS embeds through the default prompt; a checkpoint read directly has the same prompts
    direct = eval_embed.load_model(out_dir + "/ckpt-0000003")
    assert direct.prompts == cfg["prompts"]
    np.testing.assert_allclose(direct.encode(TEXTS), ours.encode(TEXTS), atol=1e-5)
    # an explicit --default_prompt replaces the run's; '' drops it
    enc2 = str(tmp_path / "cenc2")
    extract.main(["--ckpt", out_dir, "--out", enc2, "--default_prompt", ""])
    assert json.load(open(os.path.join(enc2, "config.json")))["prompts"] == {"query": S + "query: ",
                                                                           "document": S + "passage: "}
