# The quick start, stage 2: from stage 1's out/shapes_stage1, the LLM and the whole visual tokenizer learn from
# the questions for 7,000 steps of 8, into out/shapes (the model eval.py and sample.py take by default):
#   python train.py config/shapes_stage2.py
import torch

torch.set_num_threads(2)  # the quick start's figures (README, docs/LOG.md) were measured on 2 CPU cores

data_dir = "out/shapes_data"
stage = 2
template = "imgsp_v1"
data_path = f"{data_dir}/train.json"
video_folder = data_dir
init_from = "out/shapes_stage1"     # the model's shapes, tokenizer and vocabulary come with it
bert_path = f"{data_dir}/bert"      # the Q-Former's WordPiece vocab.txt; its config.json gives the head count
out_dir = "out/shapes"
video_fps = 1                       # 8 frames of each 16-frame, 2 fps clip (sample.py / eval.py default)
max_len = 512

seed = 2
learning_rate = 3e-4
# (from scratch, a rate of 1e-3 or more never learns to read the visual tokens: the loss falls on the answers'
# wording alone and the model stays at chance on anything the video decides)
max_steps = 7000
global_batch_size = 8
micro_batch_size = 8
warmup_ratio = 0.05
lr_schedule = "wsd"                 # the full rate after the warm-up, then a linear cool-down over the last fifth
cooldown_ratio = 0.2                # to a tenth of it (matched runs with and without it: docs/LOG.md)
min_lr = 3e-5                       # (a cosine from the start stalls the slow visual skills)
weight_decay = 0.0
dropout = 0.0
gradient_checkpointing = False      # nothing to save at this size; recomputing costs time
num_workers = 0                     # a worker process fights the 2 training threads for the cores
cache_videos = True                 # 4,000 clips decoded once before training, kept as EVA's features (~190 MB)
log_interval = 25
save_interval = 100000              # only the final checkpoint
