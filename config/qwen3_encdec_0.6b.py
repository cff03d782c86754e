# Qwen3-0.6B -> 28 + 28 layer encoder-decoder, UL2 on SlimPajama-6B, one node of 8 GPUs:
#   python data/slimpajama_6b_qwen3/prepare.py
#   torchrun --nproc_per_node=8 train.py config/qwen3_encdec_0.6b.py
# Global batch 512 examples x (512 encoder + 512 decoder positions) = 524K positions per step;
# 10K steps see ~2.6B source tokens, under half of SlimPajama-6B (no repeats).
out_dir = "out/qwen3-encdec-0.6b"
init_from = "qwen3"
qwen3_path = "Qwen/Qwen3-0.6B"     # or a local Hugging Face directory
data_dir = "data/slimpajama_6b_qwen3"

batch_size = 8                     # per GPU and micro-step: 8K decoder positions through the 152K-way head
grad_accum = 64                    # over all GPUs: 8 micro-steps each on 8 GPUs
enc_len = 512
dec_len = 512

# continued pretraining of a trained model with a new objective: a modest peak, long cosine
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 500
max_iters = 10000
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 500
eval_iters = 40
log_interval = 10
ckpt_interval = 1000
keep_last = 3

parallelism = "zero1"              # 1.2B parameters: weights + grads fit per GPU, optimizer state is sharded
dtype = "bfloat16"
compile = True
