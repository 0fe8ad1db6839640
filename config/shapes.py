# The quick start: a tiny LLaMA-VID trained from scratch on synthetic clips of coloured shapes, on a CPU, in
# minutes. One command writes the data to out/shapes_data (once), trains stage 1 (projectors only, captions,
# out/shapes_stage1), then stage 2 (LLM + visual tokenizer, questions, out/shapes):
#   python train.py config/shapes.py
import torch

torch.set_num_threads(2)  # the numbers in the README were measured on 2 CPU cores

data_dir = "out/shapes_data"
shapes_dataset = dict(out_dir=data_dir, n_train=4000, n_val=300, seed=0, frames=16, size=64, fps=2)
stages = (1, 2)
stage_overrides = {
    1: dict(template="plain_guided", data_path=f"{data_dir}/captions.json", init_from="scratch",
            out_dir="out/shapes_stage1", learning_rate=3e-3, max_steps=30),
    2: dict(template="imgsp_v1", data_path=f"{data_dir}/train.json", init_from="out/shapes_stage1",
            out_dir="out/shapes", learning_rate=3e-4, max_steps=7000),
}
video_folder = data_dir
tokenizer_dir = data_dir            # tokenizer.model for the scratch model (then copied into each checkpoint)
bert_path = f"{data_dir}/bert"      # the Q-Former's WordPiece vocab.txt; its config.json gives the head count
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

seed = 2                            # also draws the random EVA, which stays frozen: see the README for other seeds
global_batch_size = 8
micro_batch_size = 8
warmup_ratio = 0.05
lr_schedule = "wsd"                 # the full rate after the warm-up, then a linear cool-down over the last fifth
cooldown_ratio = 0.2                # to a tenth of it: 1-14 more points on time order in matched runs (README)
min_lr = 3e-5                       # (a cosine from the start stalls the slow visual skills)
# (from scratch, a rate of 1e-3 or more never learns to read the visual tokens: the loss falls on the answers'
# wording alone and the model stays at chance on anything the video decides)
weight_decay = 0.0
dropout = 0.0
gradient_checkpointing = False      # nothing to save at this size; recomputing costs time
num_workers = 0                     # a worker process fights the 2 training threads for the cores
cache_videos = True                 # 4,000 clips decoded once before training, kept as EVA's features (~190 MB)
log_interval = 25
save_interval = 100000              # only the final checkpoint of each stage
