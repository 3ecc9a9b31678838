# The toy JeDi at GPU size, stage 1 (issue 23): config/toy.py's recipe with twice its width at every level and the
# coupled self-attention at full resolution too, for one H100/H200 in at most 6 minutes of training wall time.
#   python train.py config/toy.py config/toy_gpu.py                               (stage 1)
#   python train.py config/toy.py config/toy_gpu.py config/toy_gpu_closeup.py     (stage 2: close-ups, exports)
#   bash toy/gpu_train.sh OUTDIR     both stages inside the wall-time budget, then the toy benchmark (docs/toy.md)
# Size: UNet 6.81M + the toy's frozen 1.60M text encoder = 8.41M parameters, a 16.0 MiB fp16 export (≤ 20 MB).
# Why (docs/toy.md): every CPU model copies colour but draws blobs, never a shape. The framed subject is ~10 px
# across: 2-3 tokens at 8×8, 5 at 16×16, so attention at 32×32 is the level where a shape can be passed on position
# by position; on 2 CPU cores it cost ~5× per step, on a GPU it is affordable.
# Why 32 px, not 64: the generator's subjects and the benchmark's classifier are made for 32 px (it reads 0.98 of
# framed shapes there), and 64 px costs 10.4× the FLOPs per image with this UNet (set of 4: 71.4 vs 6.89 GFLOP
# forward; full-resolution attention goes from 4,096 to 16,384 tokens per set), i.e. a tenth of the training
# images in the same 6 minutes; compute is what the CPU runs lacked.
# FLOPs (torch.utils.flop_counter, forward, per image): 5.06 / 5.98 / 6.89 GFLOP in sets of 2 / 3 / 4 (55 % of it
# the attention matmuls at sets of 4), ~2.3 TFLOP per step of 128 images with the backward. At an assumed 5-10 %
# of the H200's 989 TFLOP/s bf16 peak plus ~40 ms of per-step overhead that is 60-90 ms per step: ~3,600-5,000
# steps in the ~5.5 minutes the two stages train, 4-6× the CPU recipe's 200k images. toy/gpu_train.sh measures the
# real rate in stage 1 and sizes stage 2 to fill the budget; max_iters below are the plan at ~90 ms/step.
out_dir = 'out/toy_gpu'
export_path = ''  # stage 2 exports to out_dir; assets/ keeps the CPU model until this one beats it
unet_config = dict(model_channels=64, channel_mult=(1, 2, 2), attention_resolutions=(1, 2, 4), num_res_blocks=1,
                   num_head_channels=32, norm_groups=8)
images_per_batch = 128  # 8× the CPU recipe's 16: a step of 16 images would leave the GPU idle
num_workers = 8  # the generator renders ~1,000 images/s per core; 8 of the 16 cores give ~4× what a step needs
max_iters = 1200  # stage 1: ~1/3 of the steps, as the CPU recipe's 4k of 12.5k (it teaches drawing, not transfer)
warmup_iters = 100
ema_decay = 0.998  # the EMA's horizon (~500 steps) is a fraction of the run, as 0.999 is of the CPU's 12.5k steps
log_interval = 50
ckpt_interval = 0  # a checkpoint at the end of each stage only: each costs seconds the budget does not have
eval_interval = 250  # reference gain on 48 held-out sets: a fraction of a second on the GPU
eval_sets = 48
