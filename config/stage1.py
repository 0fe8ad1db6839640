# Stage 1, modality alignment (video model, 224 px): LCS-558K + WebVid 232K captions, "plain_guided" prompts.
# Trainable: mm_projector and the vlm_att projectors; the LLM, EVA, the Q-Former, vlm_att_ln/query are frozen.
stage = 1
template = "plain_guided"
data_path = "data/LLaMA-VID-Pretrain/llava_video/llava_558k_with_webvid.json"
image_folder = "data/LLaMA-VID-Pretrain/images"
video_folder = "data/LLaMA-VID-Pretrain/videos"
llm_path = "model_zoo/LLM/vicuna/7B-V1.5"
vision_path = "model_zoo/LAVIS/eva_vit_g.pth"
qformer_path = "model_zoo/LAVIS/instruct_blip_vicuna7b_trimmed.pth"
image_size = 224
compress_type = "mean"
bert_type = "qformer_pretrain_freeze"
video_fps = 1
learning_rate = 1e-3
global_batch_size = 256
max_len = 2048
out_dir = "out/llama-vid-7b-pretrain-224-video"
