# Laptop recipe, stage 3: the encoder-decoder initialised from the stage-1 decoder (T5Gemma recipe),
# trained with the default UL2 mixture. Run through scripts/laptop_recipe.py, or:
#   python train.py config/laptop_ul2.py --qwen3_path=out/laptop/qwen3_decoder
out_dir = "out/laptop/ul2"
objective = "ul2"
init_from = "qwen3"
qwen3_path = "out/laptop/qwen3_decoder"
data_dir = "data/laptop_qwen3"
trim_vocab = True

batch_size = 8
enc_len = 128
dec_len = 128
max_iters = 300
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 30
weight_decay = 0.1

eval_interval = 150
eval_iters = 10
log_interval = 50
ckpt_interval = 0
keep_last = 1
device = "cpu"
