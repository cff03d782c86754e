# Laptop recipe, stage 1: pretrain a small Qwen3-architecture decoder (causal LM) from scratch on offline
# text; it stands in for Qwen3-0.6B. Run through scripts/laptop_recipe.py, or:
#   python train.py config/laptop_decoder.py
# The vocabulary is trimmed to the ids the corpus uses (vocab_trim.py): at hidden 256 the full
# 151,936-row head would cost ~12x the blocks; checkpoints are re-expanded to full Qwen3 size.
out_dir = "out/laptop/decoder"
objective = "causal"
init_from = "scratch"
model_preset = "tiny"
model_overrides = {"hidden_size": 256, "intermediate_size": 768, "num_layers": 4, "num_heads": 4,
                   "num_kv_heads": 2, "head_dim": 64, "max_seq_len": 2048}
data_dir = "data/laptop_qwen3"
trim_vocab = True

batch_size = 16
dec_len = 128
max_iters = 400
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
weight_decay = 0.1

eval_interval = 200
eval_iters = 10
log_interval = 50
ckpt_interval = 0
keep_last = 1
device = "cpu"
