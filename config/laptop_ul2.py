# Laptop recipe, stage 3: the encoder-decoder initialised from the stage-1 decoder (T5Gemma recipe),
# trained with the default UL2 mixture. Run through scripts/laptop_recipe.py, or:
#   python train.py config/laptop_ul2.py --qwen3_path=out/laptop/qwen3_decoder
# The LM head runs on decoder positions only, so a UL2 position (encoder + decoder) is cheaper than a causal
# token: ~1.4x the decoder's real tokens per second; 600 iterations of 8 x (256 + 256) take 15.5 min on 2 idle
# cores (1.55 s per iteration, measured).
out_dir = "out/laptop/ul2"
objective = "ul2"
init_from = "qwen3"
qwen3_path = "out/laptop/qwen3_decoder"
data_dir = "out/laptop/data"
trim_vocab = True

batch_size = 8
enc_len = 256
dec_len = 256
max_iters = 600
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 50
weight_decay = 0.1

eval_interval = 300
eval_iters = 8
log_interval = 25
ckpt_interval = 300
keep_last = 1
device = "cpu"
