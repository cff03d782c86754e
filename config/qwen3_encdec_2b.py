# The 2B-per-stack variant (qwen3_encdec_2b preset: hidden 2304, d_ff 6912, 18 / 9 heads of 128).
# No Qwen3 checkpoint has this shape, so it trains from scratch: a higher peak learning rate and a
# longer warmup than the converted models, and more steps.
#   torchrun --nproc_per_node=8 train.py config/qwen3_encdec_2b.py
import os
exec(open(os.path.join(os.path.dirname(__file__), "qwen3_encdec_0.6b.py")).read())

out_dir = "out/qwen3-encdec-2b"
init_from = "scratch"
qwen3_path = ""
model_preset = "qwen3_encdec_2b"

batch_size = 4
grad_accum = 128
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 2000
max_iters = 20000                  # ~5.2B source tokens: most of SlimPajama-6B once

parallelism = "fsdp"
activation_checkpointing = True
