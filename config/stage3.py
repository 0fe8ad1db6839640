# Stage 3, hour-long video (from stage 2's video model): long_videoqa.json over precomputed EVA features.
# Trainable: the LLM and mm_projector; all vlm_att_* frozen. RoPE is stretched linearly to max_len:
# factor = ceil(65536 / 4096) = 16.
stage = 3
template = "imgsp_v1"
data_path = "data/LLaMA-VID-Finetune/long_videoqa.json"
video_folder = "data/LLaMA-VID-Finetune"
init_from = "out/llama-vid-7b-full-224-video"
image_size = 224
compress_type = "mean"
bert_type = "qformer_pretrain_freeze_all"
video_token = 2
learning_rate = 2e-5
global_batch_size = 8
max_len = 65536
out_dir = "out/llama-vid-7b-full-224-long-video"
