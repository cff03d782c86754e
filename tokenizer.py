"""Qwen3's byte-level BPE on tiktoken, plus UL2 mode tokens and 100 sentinels.

Id layout (see INTERFACES.md): BPE 0..151642, Qwen3 specials 151643..151668, UL2 mode
tokens 151669..151671, unused Qwen3 rows up to 151935, sentinels 151936..152035.
"""
QWEN3_VOCAB_SIZE = 151936
EOS_ID = 151643              # <|endoftext|>
PAD_ID = EOS_ID
DECODER_START_ID = EOS_ID
MODE_IDS = {"R": 151669, "X": 151670, "S": 151671}
SENTINEL_START = QWEN3_VOCAB_SIZE
NUM_SENTINELS = 100
VOCAB_SIZE = SENTINEL_START + NUM_SENTINELS  # 152036
IGNORE_INDEX = -100
