# The 1.5B-per-stack variant: Qwen3-1.7B has exactly the qwen3_encdec_1.5b preset's shape
# (hidden 2048, d_ff 6144, 28 layers, 16 / 8 heads), so both stacks start from it.
#   torchrun --nproc_per_node=8 train.py config/qwen3_encdec_1.5b.py
import os
exec(open(os.path.join(os.path.dirname(__file__), "qwen3_encdec_0.6b.py")).read())

out_dir = "out/qwen3-encdec-1.5b"
qwen3_path = "Qwen/Qwen3-1.7B"

batch_size = 4                     # same global batch (512) with more micro-steps per GPU
grad_accum = 128
learning_rate = 8e-5
min_lr = 8e-6

parallelism = "fsdp"               # ~3.4B parameters with fp32 Adam: shard weights, grads and state
activation_checkpointing = True
