# Stage 2, instruction tuning (video model, 224 px): LLaVA-665K + VideoChatGPT 100K, "imgsp_v1" prompts.
# Trainable: the LLM, mm_projector and every vlm_att_* module (the Q-Former too); EVA stays frozen.
stage = 2
template = "imgsp_v1"
data_path = "data/LLaMA-VID-Finetune/llava_v1_5_mix665k_with_video_chatgpt.json"
image_folder = "data/LLaMA-VID-Finetune"
video_folder = "data/LLaMA-VID-Finetune"
init_from = "out/llama-vid-7b-pretrain-224-video"  # stage 1's output
llm_path = "model_zoo/LLM/vicuna/7B-V1.5"
vision_path = "model_zoo/LAVIS/eva_vit_g.pth"
image_size = 224
compress_type = "mean"
bert_type = "qformer_pretrain"
video_fps = 1
learning_rate = 2e-5
global_batch_size = 128
max_len = 2048
out_dir = "out/llama-vid-7b-full-224-video"
