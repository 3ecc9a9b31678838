# JeDi-XL: the paper's recipe (config/jedi_sd14.py) on an SDXL base. Initialise from Stability's sd_xl_base_1.0
# (original single file or diffusers folder); the UNet is inflated to 9 input channels with zero-initialised
# reference and mask channels, so step 0 is the base model; every transformer block's attn1 is coupled across the
# set; the VAE and both text encoders stay frozen. Each image is conditioned on its own original size and crop
# (data.py reports them, train.py puts them in y); text dropout (p_drop) replaces both encoders' states and the
# pooled vector by SDXL's zero null while each image keeps its size features, so image guidance (eq. 3) works.
#   torchrun --nproc_per_node=8 train.py config/jedi_sdxl.py
#   torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 train.py config/jedi_sdxl.py
#
# Resolution: 512 px, not SDXL's native 1024. From flops.py (`python flops.py`), the JeDi-XL UNet on one set of 4:
#     512 px (64x64 latents):    forward  6.92 TFLOP (attention 0.78),  train step 20.76 TFLOP, 1.73 TFLOP/image
#     1024 px (128x128 latents): forward 36.07 TFLOP (attention 12.16), train step 108.20 TFLOP, 9.02 TFLOP/image
# 1024 px costs 5.2x the FLOPs per image (attention 15.6x: coupled attention grows with the square of the set's
# tokens, 4 x 1024 at the 32x32 level), so the paper's 140K steps x ~2048 images would take ~5x the GPU time:
# at 40 % MFU on 32 H100s (989 TFLOP/s dense bf16), 512 px is ~2048 x 3 x 1.73e12 / (32 x 0.4 x 989e12) = 0.84 s per
# step, 33 h for 140K steps (the paper's SD-1.4 run took 36 h on 32 A100s); 1024 px would be ~4.4 s per step, 7 days.
# The paper trained at 512 and its data (S3 collages cut into instances, WebVid frames, Objaverse renders) are mostly
# at or below 512 per image. SDXL was itself trained at 512 before its 1024 stage, and its size conditioning tells the
# model the target size, so sampling at 512 is in-distribution. Fine-tune at 1024 afterwards if wanted:
# --init_from=resume with --resolution=1024 keeps the weights (the UNet has no size-dependent parameters).
#
# Memory per GPU (FSDP2 shards everything trained over the world size W): JeDi-XL has 2,567,478,084 UNet parameters
# (flops.py); fp32 masters 10.3 GB + AdamW moments 20.5 GB + EMA 10.3 GB + fp32 gradients 10.3 GB = 51 GB / W
# (8 GPUs: 6.4 GB each). Replicated and frozen, bf16: the two text encoders (817M parameters, 1.6 GB) and the VAE
# (84M, 0.2 GB). Activations: activation checkpointing keeps only each block's input and recomputes one block at a
# time in the backward; how many images fit next to that is for a GPU to measure (docs/sdxl.md lists it), so start
# with images_per_batch = 8 (two sets of 4) and raise it while the log's peak memory allows.
#
# Batch arithmetic as config/jedi_sd14.py: gradient_accumulation_steps counts micro-batches over ALL ranks, images
# per step ≈ images_per_batch x gradient_accumulation_steps; 8 x 256 = 2048 images per step (the paper's 2048,
# read as images; see config/jedi_sd14.py for the sets reading). 32 GPUs: 8 micro-batches per GPU and step.
out_dir = 'out-jedi-sdxl'
init_from = 'sd'
sd_path = 'checkpoints/sd_xl_base_1.0.safetensors'  # Stability's original file; a diffusers folder works too
space = 'latent'
resolution = 512
data_spec = ('sets:data/s3/{000000..000999}.tar@1,video:data/webvid/{000000..000999}.tar@1,'
             'multiview:data/objaverse/{000000..000999}.tar@1,images:data/laion/{000000..009999}.tar@1')
set_sizes = (2, 3, 4)  # 'images' sources are always 1
images_per_batch = 8
gradient_accumulation_steps = 256
num_workers = 8
# the JeDi loss, as config/jedi_sd14.py; SDXL base is SD's scaled-linear schedule with ε-prediction
schedule = 'scaled_linear'
prediction = 'eps'
p_ref = 0.5
p_drop = 0.1
p_drop_text = 0.0
# optimisation: the paper's lr and batch; warm-up then constant
learning_rate = 5e-5
warmup_iters = 1000
lr_decay = 'constant'
max_iters = 140_000
weight_decay = 1e-2
grad_clip = 1.0
ema_decay = 0.9999
# system: bf16 compute with fp32 masters and gradient reduction (FSDP2, one unit per UNet block: 19 for SDXL's 3
# levels), activation checkpointing per block
dtype = 'bfloat16'
activation_checkpointing = True
compile = False  # not yet measured on GPUs for SDXL
log_interval = 10
ckpt_interval = 1000
eval_interval = 1000  # reference gain (train.py)
keep_checkpoints = 3
