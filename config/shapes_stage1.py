# The quick start, stage 1: a tiny LLaMA-VID from scratch on synthetic clips of coloured shapes, on a CPU. The
# projectors alone learn from captions for 30 steps, into out/shapes_stage1 (then config/shapes_stage2.py):
#   python shapes.py                              # writes out/shapes_data once
#   python train.py config/shapes_stage1.py
import torch

torch.set_num_threads(2)  # the quick start's figures (README, docs/LOG.md) were measured on 2 CPU cores

data_dir = "out/shapes_data"
stage = 1
template = "plain_guided"
data_path = f"{data_dir}/captions.json"
video_folder = data_dir
init_from = "scratch"
tokenizer_dir = data_dir            # tokenizer.model for the scratch model (then copied into each checkpoint)
bert_path = f"{data_dir}/bert"      # the Q-Former's WordPiece vocab.txt; its config.json gives the head count
out_dir = "out/shapes_stage1"
video_fps = 1                       # 8 frames of each 16-frame, 2 fps clip (sample.py / eval.py default)
image_size = 56                     # = vision_config's img_size: 4 x 4 patches a frame

# a random model: LLaMA 128 wide, 4 layers; EVA 88 wide (one 88-wide head, as EVA-g's), 2 blocks;
# Q-Former 64 wide, 2 layers, 8 queries. The EVA stays frozen at its random init in both stages.
llm_config = dict(vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=4, hidden_dim=344, max_seq_len=512)
vision_config = dict(img_size=56, patch_size=14, width=88, depth=2, heads=1, mlp_hidden=352)
token_config = dict(qformer=dict(hidden_size=64, num_layers=2, intermediate_size=128, num_query=8,
                                 max_position=128))
compress_type = "mean"              # as the released video models: a frame = its context token + one pooled token
max_len = 512

seed = 2                            # also draws the random EVA, which stays frozen: other seeds in docs/LOG.md
learning_rate = 3e-3
max_steps = 30
global_batch_size = 8
micro_batch_size = 8
warmup_ratio = 0.05
lr_schedule = "wsd"
cooldown_ratio = 0.2
min_lr = 3e-5
weight_decay = 0.0
dropout = 0.0
gradient_checkpointing = False      # nothing to save at this size; recomputing costs time
num_workers = 0                     # a worker process fights the 2 training threads for the cores
cache_videos = True                 # (stage 1 reads 240 of the 4,000 captions: nothing is decoded ahead)
log_interval = 25
save_interval = 100000              # only the final checkpoint
