# The embedded default, stage 1: a small pixel-space JeDi trained on the procedural same-subject generator on a
# laptop CPU. Stage 2 (config/toy_closeup.py) continues this run and exports what assets/ ships.
#   python train.py config/toy.py            (4k steps, ~34 minutes on 2 idle cores; see README "The toy model")
# Recipe choices (why):
# - pixel space at 32x32: no autoencoder to train or ship; subjects are designed to be legible at 32 px.
# - cosine schedule + v-prediction: at this size SD's scaled-linear/eps spends most steps on noise levels that do
#   not decide shape; v-prediction keeps the loss well-scaled at both ends.
# - coupled self-attention at 16x16 and 8x8: the only path by which a reference's subject reaches a new image.
# - ref_loss_weight = 0: references are replaced at sampling time, so no capacity is spent denoising them.
# - EMA 0.999 and a short warm-up: a short run; sample from the EMA.
out_dir = 'out/toy'
export_path = ''  # out/toy/jedi.safetensors; stage 2 exports to assets/ (what sample.py loads without --ckpt)
export_dtype = 'float16'
init_from = 'scratch'
space = 'pixel'
resolution = 32
data_spec = 'procedural'
images_per_batch = 16
set_sizes = (2, 3, 4)
num_workers = 0  # rendering costs ~1 ms per set; a worker process would only compete for the 2 cores
unet_config = dict(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(2, 4), num_res_blocks=1,
                   num_heads=4, norm_groups=8)
text_config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
train_text_encoder = False
schedule = 'cosine'
prediction = 'v'
p_ref = 0.5
p_drop = 0.1
ref_loss_weight = 0.0
learning_rate = 1e-3
lr_decay = 'cosine'
min_lr = 1e-4
warmup_iters = 200
max_iters = 4000  # stage 1 only teaches drawing (reference gain stays ~0); the 2-hour budget goes to stage 2
grad_clip = 1.0
ema_decay = 0.999
weight_decay = 0.0
log_interval = 50
ckpt_interval = 1000
eval_interval = 500  # reference gain on held-out subjects (train.py); 0 means the references are ignored
eval_data_spec = 'procedural-heldout'
keep_checkpoints = 2
seed = 0
# what sample.py uses by default with the shipped checkpoint
sample_steps = 20
sample_sampler = 'dpmpp_2m'
sample_guidance = 3.0
