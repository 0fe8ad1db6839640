# Stage 2 at Vicuna-7B / EVA-g / BERT-base shapes with random weights and synthetic data: measures FSDP2
# sharding, memory and throughput without any download. The data folder holds a tokenizer, a WordPiece vocabulary
# and a LLaVA-format JSON of ~1,500-token image and 64-frame video conversations:
#   python bench.py --train-data out/random7b_data      # once
#   torchrun --nproc_per_node=8 train.py config/random7b.py
#   python train.py config/random7b.py "--llm_config={'n_layers': 16}"   # one GPU: half the layers fit
stage = 2
init_from = "scratch"
llm_config = {}              # LLaMAConfig defaults: Vicuna-7B
vision_config = {}           # EVAConfig defaults: EVA-ViT-g/14 at 224, 39 blocks
token_config = {}            # BERT-base Q-Former, 32 queries
data_dir = "out/random7b_data"
tokenizer_dir = data_dir
bert_path = data_dir
data_path = f"{data_dir}/data.json"
image_folder = data_dir
video_folder = data_dir
global_batch_size = 8
micro_batch_size = 2
max_steps = 6
warmup_ratio = 0.0
learning_rate = 1e-5
dropout = 0.0                # so runs on different GPU counts can be compared step by step
num_workers = 2
save_checkpoints = False
