# Stage 1 of the image-only 336 px model: LCS-558K captions only, all 576 patch tokens kept (no compression).
exec(open("config/stage1.py").read())
data_path = "data/LLaMA-VID-Pretrain/blip_laion_cc_sbu_558k.json"
image_size = 336
compress_type = None
out_dir = "out/llama-vid-7b-pretrain-336"
