# Laptop recipe, stage 1: pretrain a small Qwen3-architecture decoder (causal LM) from scratch on English
# Wikipedia; it stands in for Qwen3-0.6B. Run through scripts/laptop_recipe.py, or:
#   python train.py config/laptop_decoder.py --data_dir=out/laptop/data
# Where the minutes go: the vocabulary is trimmed to the ids the shards use (vocab_trim.py), ~51K rows for
# the 18 MB of Wikipedia the recipe tokenizes, and that LM head still costs 6 x 51K x 256 = 79 MFLOP per
# token, 2.8x the 6-layer body (28 MFLOP): a block costs ~6 x 12 x hidden^2, so depth is cheap next to the
# head (6 layers cost 1.1x what 4 do). Measured on 2 idle cores: ~1,820 tokens/s, 1.12 s per iteration, so
# the 1600 iterations of 8 x 256 tokens (3.3M tokens, one pass over the 3.8M of the shards) take 30 min.
# Checkpoints are re-expanded to the full Qwen3 vocabulary.
out_dir = "out/laptop/decoder"
objective = "causal"
init_from = "scratch"
model_preset = "tiny"
model_overrides = {"hidden_size": 256, "intermediate_size": 768, "num_layers": 6, "num_heads": 4,
                   "num_kv_heads": 2, "head_dim": 64, "max_seq_len": 2048}
data_dir = "out/laptop/data"
trim_vocab = True

batch_size = 8
dec_len = 256
max_iters = 1600
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 100
weight_decay = 0.1

eval_interval = 800
eval_iters = 8
log_interval = 25
ckpt_interval = 400                # a killed run resumes (--init_from=resume) from the last one
keep_last = 1
device = "cpu"
