# Stage 2 of the image-only 336 px model: LLaVA-665K only, all 576 patch tokens kept (no compression).
exec(open("config/stage2.py").read())
data_path = "data/LLaMA-VID-Finetune/llava_v1_5_mix665k.json"
init_from = "out/llama-vid-7b-pretrain-336"
image_size = 336
compress_type = None
out_dir = "out/llama-vid-7b-full-336"
