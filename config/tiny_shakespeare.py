# A tiny encoder-decoder on Tiny Shakespeare, on CPU in about a minute:
#   python data/shakespeare_qwen3/prepare.py && python train.py config/tiny_shakespeare.py
# The 152,036-row tied embedding is most of the model and most of the compute at this width
# (the LM head costs ~12x the blocks per decoder position), so the blocks stay small and the
# windows short; the loss falls from ln(152036) = 11.9 mostly by learning which tokens occur.
out_dir = "out/tiny-shakespeare"
init_from = "scratch"
data_dir = "data/shakespeare_qwen3"
model_preset = "tiny_encdec"       # 2 + 2 layers
model_overrides = {"hidden_size": 128, "intermediate_size": 384, "num_heads": 4, "num_kv_heads": 2, "head_dim": 32}

batch_size = 4
enc_len = 64
dec_len = 64

learning_rate = 3e-3               # tiny model, few steps: a high peak
min_lr = 3e-4
warmup_iters = 10
max_iters = 80

eval_interval = 40
eval_iters = 8
log_interval = 10
ckpt_interval = 0                  # one checkpoint, at the end

device = "cpu"
compile = False
