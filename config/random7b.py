# Stage 2 at Vicuna-7B / EVA-g / BERT-base shapes with random weights and synthetic data: measures FSDP2
# sharding, memory and throughput without any download. `.gpu/` holds a tokenizer, a WordPiece vocabulary
# and a LLaVA-format JSON of ~1,500-token image and 64-frame video conversations:
#   python bench.py --train-data .gpu             # once
#   torchrun --nproc_per_node=2 train.py config/random7b.py
stage = 2
init_from = "scratch"
llm_config = {}              # LLaMAConfig defaults: Vicuna-7B
vision_config = {}           # EVAConfig defaults: EVA-ViT-g/14 at 224, 39 blocks
token_config = {}            # BERT-base Q-Former, 32 queries
tokenizer_dir = ".gpu"
bert_path = ".gpu"
data_path = ".gpu/data.json"
image_folder = ".gpu"
video_folder = ".gpu"
global_batch_size = 8
micro_batch_size = 2
max_steps = 6
warmup_ratio = 0.0
learning_rate = 1e-5
dropout = 0.0                # so runs on different GPU counts can be compared step by step
num_workers = 2
save_checkpoints = False
