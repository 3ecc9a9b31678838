# A tiny scratch model for tests and smoke runs: pixel space at 16 px, a random frozen text encoder,
# ~0.2M-parameter UNet; a step takes a few tens of ms on one CPU core.
#   python train.py config/tiny.py
#   torchrun --standalone --nproc_per_node=2 train.py config/tiny.py
out_dir = 'out-tiny'
init_from = 'scratch'
space = 'pixel'  # the "latent" is the image: UNet in 2*3+1 = 7 channels, out 3
resolution = 16
data_spec = 'procedural'
images_per_batch = 4  # 2 sets of 2 per rank
set_sizes = (2,)
num_workers = 0  # no worker processes: fast start, deterministic
unet_config = dict(model_channels=16, channel_mult=(1, 2), attention_resolutions=(1, 2), num_res_blocks=1,
                   num_heads=2, norm_groups=8)
text_config = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
schedule = 'cosine'
prediction = 'v'
learning_rate = 1e-3
warmup_iters = 5
lr_decay = 'constant'
max_iters = 20
weight_decay = 0.0
ema_decay = 0.9
log_interval = 1
ckpt_interval = 10
keep_checkpoints = 2
