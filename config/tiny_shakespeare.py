# A tiny encoder-decoder on Tiny Shakespeare, on CPU in about a minute:
#   python data/shakespeare_qwen3/prepare.py && python train.py config/tiny_shakespeare.py
#   python sample.py --ckpt out/tiny-shakespeare --prompt "ROMEO: I will <extra_id_0> to the <extra_id_1>."
# At this width the 152,036-row tied embedding would be nearly all of the compute (the LM head costs ~12x the
# blocks per decoder position), so the vocabulary is trimmed to the ~12K ids the text uses (vocab_trim.py:
# the loss is over those classes, starting near ln(12K) = 9.4; the checkpoint is written at full size).
# Rows are packed (several UL2 examples per row), so each step trains on ~batch_size x (enc_len + dec_len)
# real tokens. Expect the loss to fall from ~9 at the first log to ~5 by iteration 900 (val 9.43 -> 5.66),
# the decoder to open R-mode targets with <extra_id_0>, and greedy spans made of frequent words (', and').
out_dir = "out/tiny-shakespeare"
init_from = "scratch"
data_dir = "data/shakespeare_qwen3"
model_preset = "tiny_encdec"       # 2 + 2 layers
model_overrides = {"hidden_size": 128, "intermediate_size": 384, "num_heads": 4, "num_kv_heads": 2, "head_dim": 32}
trim_vocab = True

batch_size = 8
enc_len = 64
dec_len = 64

learning_rate = 3e-3               # tiny model, few steps: a high peak
min_lr = 3e-4
warmup_iters = 10
max_iters = 900                    # ~67 ms each on 2 idle cores: about a minute

eval_interval = 150
eval_iters = 4
log_interval = 5
ckpt_interval = 0                  # one checkpoint, at the end

device = "cpu"
compile = False
