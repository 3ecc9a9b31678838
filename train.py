"""Train JeDi: one file, read top to bottom. The same code path runs 1 process or K under torchrun (any nodes).

    python train.py config/tiny.py                                   # one process (CPU or one GPU)
    python train.py config/tiny.py --max_iters=100 --learning_rate=3e-4
    torchrun --standalone --nproc_per_node=8 train.py config/jedi_sd14.py
    torchrun --standalone --nproc_per_node=8 train.py config/jedi_sdxl.py       # JeDi-XL (docs/sdxl.md)
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HOST:29500 train.py config/jedi_sd14.py
    python train.py config/tiny.py --init_from=resume --export_only=True   # EMA weights -> {out_dir}/jedi.safetensors

Config: the typed globals below, overridden by `config/*.py` files (plain assignments, run in order) and then by
`--key=value` (a Python literal, checked against the default's type). A config file may only set known keys;
helpers it needs must start with `_`.

Batch: a micro-batch is `images_per_batch` images per rank (data.py buckets sets of one size N, so B·N ≈ constant);
`gradient_accumulation_steps` counts micro-batches per optimizer step over ALL ranks (nanoGPT's convention), so
each rank accumulates gradient_accumulation_steps // world_size of them and the global batch stays the same at any
world size: images/step ≈ images_per_batch × gradient_accumulation_steps. Sets/step depend on the set-size mix
(config/jedi_sd14.py works it out for the paper's recipe); the log prints the measured rates.

Parallelism (here only; model/ has none): every UNet block (`unet.blocks`), the UNet and the root are FSDP2
`fully_shard` units; params are bf16 for compute and gradients reduced in fp32 on GPU, plain fp32 on CPU (gloo).
Activation checkpointing and torch.compile are applied per block before sharding. The UNet is built on the meta
device, sharded, materialised with to_empty and filled from a full state dict (init) or a checkpoint (resume).
The frozen VAE and text conditioner are replicated, unsharded, gradient-free, in `dtype` on GPU.

Base models: SD-1.x or SDXL (told from sd_path; model.conditioner.TextConditioner holds the text side). SDXL's y
carries each image's own size and crop (data.py reports them) and survives text dropout: its null is built per
batch with the images' sizes.

Checkpoints: {out_dir}/ckpt/step_XXXXXXXX/ with torch.distributed.checkpoint shards (model, AdamW, EMA), meta.json
and each rank's data-loader state; written to .tmp_step_XXXXXXXX and renamed when complete, so a half-written one
never counts. Every `ckpt_interval` steps (0: none in between), at the end and on SIGTERM; the last
`keep_checkpoints` kept. out_dir must be on a filesystem every node sees. A resume restores weights, optimizer,
EMA, step and data position at any world size (exactly at the same one). There is no RNG state to save: every
random draw of step s on rank r comes from a generator seeded by (seed, s, r, micro-batch), so a resumed run draws
what the uninterrupted one would have.

MFU: UNet forward FLOPs per image are counted once per set size by flops.py on the meta device (no compute; the
count every benchmark uses), ×3 for forward+backward (activation-checkpoint recompute not counted: model FLOPs, not
hardware FLOPs; the VAE and text encoder are not counted), divided by wall time × world size × the card's dense bf16
peak (flops.peak_bf16_flops, or peak_flops).
"""
import functools
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import configurator
from model.diffusion import DEFAULT_GUIDANCE, Diffusion, jedi_loss, reference_gain_sums
from model.unet import UNet, UNetConfig

# ----------------------------------------------------------------------------- config
# I/O
out_dir: str = 'out'  # checkpoints, logs and the export go here
init_from: str = 'scratch'  # 'scratch' (sizes below) | 'sd' (UNet, VAE and text encoder from sd_path) | 'resume'
sd_path: str = ''  # SD-1.x/SDXL .ckpt, .safetensors or diffusers folder; with 'scratch': the VAE and text side
num_heads: int = 0  # UNet heads of the base checkpoint (shapes cannot tell); 0: its flavour's (SD-1.x 8, SDXL dim 64)
log_interval: int = 10  # steps between log lines
ckpt_interval: int = 1000  # steps between checkpoints (0: only at the end and on SIGTERM)
keep_checkpoints: int = 3  # the newest N checkpoints are kept, older ones deleted
export_path: str = ''  # consolidated EMA weights for sample.py; '' = {out_dir}/jedi.safetensors
export_only: bool = False  # load (usually --init_from=resume), write the export, stop
export_dtype: str = 'float32'  # 'float16' halves the file (the shipped toy model); sample.py computes in fp32
tensorboard: bool = False  # only if the tensorboard package is installed
eval_interval: int = 0  # steps between reference-gain evaluations (0 = off); see reference_gain() in main
eval_sets: int = 16  # sets of 2 per rank in that evaluation (a fixed batch, drawn once with another seed)
eval_data_spec: str = ''  # its data ('' = data_spec; the toy uses the held-out subjects: 'procedural-heldout')
# data
data_spec: str = 'procedural'  # see data.py: 'procedural' | 'type:path@weight,...'
resolution: int = 32  # pixels
images_per_batch: int = 12  # per rank and micro-batch
set_sizes: tuple = (2, 3, 4)  # images per set N, one N per micro-batch (bucketed by data.py)
num_workers: int = 2  # data-loader worker processes per rank
overfit_one_batch: bool = False  # repeat the first batch AND its noise, timesteps and masks: the loss must go down
# model
space: str = 'latent'  # 'latent' (SD VAE, 4 channels) | 'pixel' (the image itself, 3 channels; no VAE)
# scratch only: UNetConfig fields (in/out channels and context_dim are set by train.py)
unet_config: dict = dict(model_channels=320, channel_mult=(1, 2, 4, 4), attention_resolutions=(1, 2, 4),
                         num_res_blocks=2, num_heads=8)
# scratch without sd_path: overrides of sd14_text_config for a small random text encoder
text_config: dict = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
train_text_encoder: bool = False  # also train the text encoder (SD-1.x only; SD-1.4 and the paper keep it frozen)
# diffusion and the JeDi loss (model/diffusion.py)
schedule: str = 'scaled_linear'  # 'scaled_linear' (SD) | 'linear' | 'cosine'
prediction: str = 'eps'  # 'eps' | 'v'
p_ref: float = 0.5  # per image: its clean latent is given as reference
p_drop: float = 0.1  # per set: text AND references dropped (image-guidance null)
p_drop_text: float = 0.0  # per set: only the text dropped (3-pass guidance)
ref_loss_weight: float = 1.0  # loss weight of images given as reference (1 = the paper's plain MSE over the set)
# sampling defaults written into the export (sample.py uses them when its flags are not given)
sample_steps: int = 50  # sampling steps
sample_guidance: float = DEFAULT_GUIDANCE  # image guidance λ of eq. 3 (the one default, model/diffusion.py)
sample_sampler: str = 'ddim'  # 'ddim' | 'dpmpp_2m'
# optimizer
learning_rate: float = 5e-5  # peak AdamW learning rate (the paper: 5e-5)
lr_decay: str = 'constant'  # after warm-up: 'constant' (SD fine-tuning) | 'cosine' (to min_lr at max_iters)
min_lr: float = 0.0  # the cosine decay's final learning rate
warmup_iters: int = 1000  # linear warm-up from 0
max_iters: int = 140000  # optimizer steps in all
weight_decay: float = 1e-2  # AdamW weight decay
beta1: float = 0.9  # AdamW β1
beta2: float = 0.999  # AdamW β2
grad_clip: float = 1.0  # 0 = no clipping (the norm is still logged)
gradient_accumulation_steps: int = 1  # micro-batches per step over ALL ranks (keep it a multiple of the world size)
ema_decay: float = 0.9999  # EMA of the UNet weights (what the export holds)
# system
device: str = 'auto'  # 'auto' | 'cpu' | 'cuda'
dtype: str = 'auto'  # compute dtype: 'auto' = bfloat16 on GPU, float32 on CPU (no float16: it would need loss scaling)
compile: bool = False  # torch.compile each UNet block
activation_checkpointing: bool = False  # recompute each UNet block in the backward (less memory, ~1/3 more compute)
channels_last: bool = False  # NHWC activations from the first convolution on (cuDNN's faster layout; same math)
seed: int = 0  # base of every random draw: step s on rank r is seeded from (seed, s, r, micro-batch)
peak_flops: float = 0.0  # per-device dense bf16 FLOP/s for MFU; 0 = guess from the GPU name
config_keys = configurator.config_keys(globals())


def configure(argv):
    """Config files, then --key=value flags, into this module's globals (configurator.py)."""
    configurator.configure(argv, globals(), config_keys, SystemExit)


# ----------------------------------------------------------------------------- helpers

def check_config():
    """Keys with a fixed set of values: a typo stops the run before anything is built."""
    for key, allowed in (('init_from', ('scratch', 'sd', 'resume')), ('space', ('latent', 'pixel')),
                         ('lr_decay', ('constant', 'cosine')), ('schedule', ('scaled_linear', 'linear', 'cosine')),
                         ('prediction', ('eps', 'v')), ('dtype', ('auto', 'bfloat16', 'float32')),
                         ('device', ('auto', 'cpu', 'cuda'))):
        if globals()[key] not in allowed:
            raise SystemExit(f'{key} must be one of {allowed}, not {globals()[key]!r}')


def lr_at(step):
    """Linear warm-up to learning_rate, then constant or cosine down to min_lr at max_iters."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / warmup_iters
    if lr_decay == 'constant':
        return learning_rate
    progress = min(1.0, (step - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def step_generator(step, rank, micro, device):
    """Every random draw of a micro-batch (timesteps, noise, masks, drops, VAE posterior) comes from here."""
    g = torch.Generator(device=device)
    return g.manual_seed(int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(1)[0]))


def latest_checkpoint(root):
    """Newest complete checkpoint dir (meta.json is written last, before the rename), or None."""
    done = [d for d in os.listdir(root) if re.fullmatch(r'step_\d{8}', d) and os.path.isfile(f'{root}/{d}/meta.json')] \
        if os.path.isdir(root) else []
    return os.path.join(root, max(done)) if done else None


def log(msg):
    """Rank 0 prints and appends to {out_dir}/train.log; the other ranks stay quiet."""
    if dist.get_rank() == 0:
        print(msg, flush=True)
        with open(os.path.join(out_dir, 'train.log'), 'a') as f:
            f.write(msg + '\n')


def loss_settings():
    """The config's JeDi loss settings, as Trainee's keyword arguments."""
    return dict(p_ref=p_ref, p_drop=p_drop, p_drop_text=p_drop_text, ref_loss_weight=ref_loss_weight)


class Trainee(nn.Module):
    """What FSDP's root wraps: the UNet, plus the text encoder when it is trained (SD-1.x's one encoder; ids
    (B·N, 77)). forward() returns the JeDi loss (model.diffusion.jedi_loss with the given settings).
    context/null_context: tensors or model.conditioning.Cond (a pytree node, so FSDP2's input cast reaches its
    context and y); SDXL's null has one row per image, each with that image's size features."""

    def __init__(self, unet, text_encoder=None, null_ids=None, *, p_ref, p_drop, p_drop_text, ref_loss_weight):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        self.null_ids = null_ids  # (1, 77) ids of "", not a buffer: it stays out of the state dict
        self.loss_settings = dict(p_ref=p_ref, p_drop=p_drop, p_drop_text=p_drop_text, ref_loss_weight=ref_loss_weight)

    def forward(self, x0, set_size, generator, diffusion, context=None, null_context=None, ids=None):
        if self.text_encoder is not None:
            states = self.text_encoder(input_ids=torch.cat([ids, self.null_ids.to(ids.device)])).last_hidden_state
            context, null_context = states[:-1], states[-1:]  # (B·N + 1, 77, D) -> captions, ""
        return jedi_loss(self.unet, diffusion, x0, context, null_context, set_size, generator=generator,
                         **self.loss_settings)


class TrainState:
    """Model, AdamW and EMA for torch.distributed.checkpoint (Stateful): sharded, resharded on load."""

    def __init__(self, model, optimizer, ema):
        self.model, self.optimizer, self.ema = model, optimizer, ema

    def state_dict(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {'model': model_sd, 'optim': optim_sd, 'ema': self.ema}

    def load_state_dict(self, sd):
        from torch.distributed.checkpoint.state_dict import set_state_dict
        set_state_dict(self.model, self.optimizer, model_state_dict=sd['model'], optim_state_dict=sd['optim'])
        with torch.no_grad():
            for k, v in sd['ema'].items():  # DCP usually loads in place; copy in case it handed back new tensors
                if v is not self.ema[k]:
                    self.ema[k].copy_(v)


_stop_requested = False  # set by SIGTERM; acted on at the end of the current step, by all ranks together


def _on_sigterm(signum, frame):
    global _stop_requested
    _stop_requested = True


# ----------------------------------------------------------------------------- processes and models

@dataclass
class Runtime:
    """Where this process runs and in what precision."""
    rank: int
    world: int
    dev: str  # 'cpu' | 'cuda:<local rank>'
    mesh: object  # 1-D DeviceMesh over all ranks: every FSDP2 unit is sharded over it
    compute_dtype: torch.dtype

    @property
    def master(self):
        return self.rank == 0


def compute_dtype_for(dev):
    """The config's dtype: 'auto' = bfloat16 on GPU, float32 on CPU."""
    return {'auto': torch.bfloat16 if dev.startswith('cuda') else torch.float32,
            'bfloat16': torch.bfloat16, 'float32': torch.float32}[dtype]


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; alone we are a world of one, the same code path."""
    from torch.distributed.device_mesh import init_device_mesh

    distributed = int(os.environ.get('RANK', -1)) != -1
    rank, world, local_rank = (int(os.environ[k]) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')) \
        if distributed else (0, 1, 0)
    dev = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    if dev == 'cuda':
        dev = f'cuda:{local_rank}'
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    backend = 'nccl' if dev.startswith('cuda') else 'gloo'
    if distributed:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Runtime(rank, world, dev, init_device_mesh(dev.split(':')[0], (world,)), compute_dtype_for(dev))


@dataclass
class Parts:
    """What a run trains and what it keeps frozen; meta.json records the fields that shape them."""
    space: str  # 'latent' | 'pixel'
    sd_path: str  # the SD checkpoint the VAE and text encoder come from; '' for a random text encoder
    ucfg: UNetConfig
    diffusion: Diffusion
    text: nn.Module  # model.conditioner.TextConditioner: frozen (replicated, compute dtype), or its one encoder
    #                  trained (then sharded inside Trainee)
    vae: nn.Module | None  # frozen; None in pixel space
    frozen_text: bool
    text_random: bool  # a random text encoder: saved with every checkpoint so that resumes match
    text_config: dict
    full_unet_sd: dict | None  # the UNet's initial weights (scratch, sd); None on resume: the checkpoint has them
    # rank 0's fp32 CPU weights of the frozen text conditioner and VAE from sd_path, kept when they compute in
    # another dtype: the export holds the base model's own weights, not their bf16 rounding (None: use the modules)
    frozen_fp32: dict | None = None


def freeze(module, dev, compute_dtype):
    """A frozen part (VAE, text encoder): replicated, no grads, in the compute dtype."""
    return module.to(dev, compute_dtype).eval().requires_grad_(False)


def build_parts(meta, resume_dir, rt):
    """The models to build: a checkpoint's meta.json wins over the config for everything that shapes them."""
    from safetensors.torch import load_file

    from model.conditioner import as_text_conditioner
    from model.loading import CheckpointError, load_sd, strict_load
    from model.text import build_text_encoder, sd14_text_config

    model_space, src = meta.get('space', space), meta.get('sd_path', sd_path)
    frozen_text = not meta.get('train_text_encoder', train_text_encoder)
    if (init_from == 'sd' or model_space == 'latent') and not src:
        raise SystemExit('sd_path is needed for init_from=sd and for latent space (VAE and text encoder come from it)')
    if init_from == 'sd' and model_space == 'pixel':
        raise SystemExit('init_from=sd works in latent space only')

    vae, full_unet_sd, text_random, frozen_fp32 = None, None, False, None
    if src:  # frozen VAE and text encoder from the SD checkpoint (the UNet too when init_from=sd)
        try:
            sd = load_sd(src, num_heads=num_heads, ema=True)
        except (CheckpointError, FileNotFoundError) as e:  # one line naming the file, before any work
            raise SystemExit(f'sd_path: {str(e).replace(chr(10), " ")}') from None
        text, vae = sd.text, (sd.vae if model_space == 'latent' else None)  # SD-1.x: one encoder; SDXL: two
        if not frozen_text and (len(text.encoders) > 1 or text.y_dim is not None):
            raise SystemExit('train_text_encoder=True is for SD-1.x (one text encoder, no pooled vector); SDXL\'s '
                             'two encoders stay frozen, as in the paper')
        if init_from == 'sd':
            full_unet_sd, ucfg = sd.unet.state_dict(), sd.unet.config
        if rt.master and rt.compute_dtype != torch.float32:  # references only: freeze() below makes new tensors
            frozen_fp32 = dict(text=sd.text.state_dict(), vae=vae.state_dict() if vae is not None else None)
        del sd
    else:  # pixel space without SD: a small random text encoder, saved with every checkpoint so resumes match
        tcfg = sd14_text_config(**meta.get('text_config', text_config))
        torch.manual_seed(seed)
        text_encoder, text_random = build_text_encoder(tcfg), True
        if resume_dir and frozen_text:
            strict_load(text_encoder, load_file(os.path.join(resume_dir, 'text_encoder.safetensors')), 'text encoder')
        text = as_text_conditioner(text_encoder)  # the SD-1.x conditioner around it
    if init_from != 'sd':
        channels = 4 if model_space == 'latent' else 3
        ucfg = UNetConfig(**meta['unet_config']) if resume_dir else UNetConfig(
            **{**unet_config, 'in_channels': 2 * channels + 1, 'out_channels': channels,
               'context_dim': text.context_dim, 'adm_in_channels': text.y_dim})
        if init_from == 'scratch':
            torch.manual_seed(seed)
            full_unet_sd = UNet(ucfg).state_dict()  # the same seeded init on every rank
    for m in (vae, text if frozen_text else None):
        if m is not None:
            freeze(m, rt.dev, rt.compute_dtype)
    diffusion = Diffusion(schedule=meta.get('schedule', schedule), prediction=meta.get('prediction', prediction))
    return Parts(model_space, src, ucfg, diffusion, text, vae, frozen_text, text_random,
                 meta.get('text_config', text_config), full_unet_sd, frozen_fp32)


def use_channels_last(unet):
    """Make the first convolution's input NHWC: cuDNN then runs each convolution NHWC and the activations stay so
    as far as the ops pass it on. jedi_input's cat (with the broadcast mask) returns NCHW, hence the hook; the
    weights stay NCHW (FSDP2 shards contiguous parameters). The same math, in another memory order."""
    unet.input_blocks[0][0].register_forward_pre_hook(
        lambda mod, args: (args[0].contiguous(memory_format=torch.channels_last), *args[1:]))
    return unet


def parallelize(model, mesh, compute_dtype, use_compile=False, use_ac=False):
    """torchtitan's order, per UNet block: compile, activation checkpointing, then fully_shard; then the UNet, the
    trained text encoder and the root. Params are `compute_dtype` for compute; gradients reduce in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.utils.checkpoint import checkpoint

    unet = model.unet
    if use_compile:  # all blocks share one forward code object, and dynamo caches graphs per code object:
        # static shapes (a graph per block and set size; dynamic ones broke inductor on CPU) and room for them all
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(unet.blocks))
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                               16 * len(unet.blocks))
    for block in unet.blocks:  # wrap forward, not the module: state-dict names stay unchanged, FSDP hooks stay eager
        fwd = torch.compile(block.forward, dynamic=False) if use_compile else block.forward
        if use_ac:  # keep only the block's input; recompute (compiled) in backward
            fwd = functools.partial(checkpoint, fwd, use_reentrant=False)
        block.forward = fwd
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) \
        if compute_dtype != torch.float32 else MixedPrecisionPolicy()
    for block in unet.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(unet, mesh=mesh, mp_policy=mp)  # time embedding and output head; casts the UNet's inputs
    if model.text_encoder is not None:
        fully_shard(model.text_encoder, mesh=mesh, mp_policy=mp)
    # the root keeps x0 and the noise in fp32 (targets are computed outside the UNet); it holds no parameters itself
    root_mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    fully_shard(model, mesh=mesh, mp_policy=root_mp, reshard_after_forward=False)
    return model


def build_model(parts, null_ids, rt):
    """The trained model: meta device -> compile / AC per block -> fully_shard -> to_empty -> the initial weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    with torch.device('meta'):
        unet = UNet(parts.ucfg)
    if channels_last:
        use_channels_last(unet)
    trained_text = None if parts.frozen_text else parts.text.encoders[0].train().requires_grad_(True)
    model = parallelize(Trainee(unet, trained_text, null_ids, **loss_settings()), rt.mesh, rt.compute_dtype,
                        compile, activation_checkpointing)
    unet.to_empty(device=rt.dev)
    if parts.full_unet_sd is not None:
        full = {f'unet.{k}': v for k, v in parts.full_unet_sd.items()}
        if trained_text is not None:
            full.update({f'text_encoder.{k}': v for k, v in trained_text.state_dict().items()})
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
        del full
        parts.full_unet_sd = None  # loaded: free the full copy
    return model


def build_optimizer(model):
    """AdamW over the trained parameters, and their EMA (sharded like the params: DTensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(beta1, beta2), weight_decay=weight_decay,
                                  fused=True)  # one kernel over all params: far less DTensor dispatch
    with torch.no_grad():
        ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    return params, optimizer, ema


# ----------------------------------------------------------------------------- one step

def image_sizes(batch, resolution):
    """SDXL's micro-conditioning of every image of a loader batch, flat over sets: original_size (B·N, 2) and
    crop_top_left (B·N, 2) as data.py reports them, target_size the training resolution (as sgm trains).
    TextConditioner's keyword arguments; a conditioner without micro-conditioning (SD-1.x) ignores them."""
    return dict(original_size=batch['original_size'].flatten(0, 1), crop_top_left=batch['crop_top_left'].flatten(0, 1),
                target_size=(resolution, resolution))  # (B, N, 2) -> (B·N, 2)


def prepare(batch, generator, vae, text, tokenize, dev, compute_dtype):
    """A loader batch -> (x0 (B·N, C, h, w) latents or pixels, ids (B·N, E, 77) or (B·N, 77), the text conditioning
    (a Cond, each image with its own sizes) or None). The frozen VAE and text conditioner (or a bare SD-1.x text
    encoder) run here, outside the trained model; text=None when the text encoder is trained."""
    from model.conditioner import as_text_conditioner

    px = batch['pixels'].flatten(0, 1).to(dev, non_blocking=True)  # (B, N, 3, H, W) -> (B·N, 3, H, W)
    ids = torch.stack([tokenize(c) for caps in batch['captions'] for c in caps]).to(dev)  # (B·N, [E,] 77)
    with torch.no_grad():
        x0 = px if vae is None else vae.encode_latents(px.to(compute_dtype), sample=True, generator=generator).float()
        context = None if text is None else as_text_conditioner(text)(ids, **image_sizes(batch, px.shape[-1]))
    return x0, ids, context


def caption_tokenizer(tokenizer):
    """caption -> its ids, cached: captions repeat (every image of a set, every epoch). tokenizer: a
    TextConditioner ((E, 77): one row per encoder) or a model.text.Tokenizer ((77,))."""
    tok = tokenizer.tokenize if hasattr(tokenizer, 'tokenize') else tokenizer
    return functools.lru_cache(maxsize=100_000)(lambda caption: tok([caption])[0])


def null_text(text, sizes=None):
    """The unconditional text for a micro-batch: SDXL's zeros with each image's own size features (B·N rows, so
    a dropped image keeps its sizes), or SD-1.x's encoded "" (one row, the same for every batch: pass sizes=None
    once and reuse it)."""
    with torch.no_grad():
        return text.null(**(sizes or {}))


def micro_batch(batch, step, micro, parts, tokenize, null_context, rt):
    """-> (model inputs, set size N, generator) for micro-batch `micro` of `step`, latents and text states made now.
    null_context: the reused SD-1.x null, or None: made per batch from the images' sizes (SDXL)."""
    g = step_generator(0 if overfit_one_batch else step, rt.rank, micro, rt.dev)
    x0, ids, context = prepare(batch, g, parts.vae, parts.text if parts.frozen_text else None, tokenize,
                               rt.dev, rt.compute_dtype)
    if not parts.frozen_text:  # the trained SD-1.x encoder makes the text and its null inside the model
        ids = ids[:, 0]  # (B·N, 1, 77) -> (B·N, 77)
    elif null_context is None:
        null_context = null_text(parts.text, image_sizes(batch, batch['pixels'].shape[-1]))
    return dict(x0=x0, context=context, null_context=null_context, ids=ids), batch['pixels'].shape[1], g


def forward_backward(model, diffusion, micro_batches, accum):
    """Gradients of the loss averaged over `accum` micro-batches, reduce-scattered once, on the last.
    -> (the mean loss on this rank, a float64 tensor; [(images, set size) per micro-batch])."""
    loss_acc, shapes = 0.0, []
    for micro, (inputs, N, g) in enumerate(micro_batches):
        model.set_requires_gradient_sync(micro == accum - 1)
        loss = model(set_size=N, generator=g, diffusion=diffusion, **inputs)
        (loss / accum).backward()
        loss_acc = loss_acc + loss.detach().double() / accum
        shapes.append((inputs['x0'].shape[0], N))
    return loss_acc, shapes


def clip_gradients(params):
    """Clip to grad_clip (0: no clipping) -> the global grad norm (a plain tensor)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float('inf'), foreach=True)
    return grad_norm.full_tensor() if hasattr(grad_norm, 'full_tensor') else grad_norm  # replicated already


def optimizer_step(model, optimizer, ema):
    """AdamW, then the EMA on the local shards (no communication)."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch._foreach_lerp_([e.to_local() for e in ema.values()],
                             [p.detach().to_local() for p in model.parameters()], 1 - ema_decay)


# ----------------------------------------------------------------------------- checkpoints, export, evaluation

def resume(state, resume_dir, meta, rt):
    """Weights, AdamW and EMA, resharded to this world size -> (step, this rank's data-loader state or None)."""
    import torch.distributed.checkpoint as dcp

    dcp.load({'train': state}, checkpoint_id=resume_dir)
    f, data_state = os.path.join(resume_dir, f'data_rank{rt.rank}.json'), None
    if meta['world_size'] == rt.world and os.path.isfile(f):  # exact data position; else start_step (approximate
        data_state = json.load(open(f))  # for streaming WebDataset shards, exact for indexable sources)
    log(f'resumed from {resume_dir} at step {meta["step"]} (saved at world size {meta["world_size"]}, now {rt.world})')
    return meta['step'], data_state


def save_checkpoint(state, step, parts, loader, rt):
    """{out_dir}/ckpt/step_XXXXXXXX, written to .tmp_step_XXXXXXXX and renamed when complete; the last
    keep_checkpoints kept."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    ckpt_root = os.path.join(out_dir, 'ckpt')
    final, tmp = f'{ckpt_root}/step_{step:08d}', f'{ckpt_root}/.tmp_step_{step:08d}'
    if rt.master:
        for d in os.listdir(ckpt_root):  # leftovers of a killed save
            if d.startswith('.tmp_'):
                shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dcp.save({'train': state}, checkpoint_id=tmp)
    with open(os.path.join(tmp, f'data_rank{rt.rank}.json'), 'w') as f:
        json.dump(loader.state(), f)
    dist.barrier()
    if rt.master:
        if parts.text_random and parts.frozen_text:
            encoder = parts.text.encoders[0]  # the random SD-1.x encoder, as it was saved before the conditioner
            save_file({k: v.detach().float().cpu().contiguous() for k, v in encoder.state_dict().items()},
                      os.path.join(tmp, 'text_encoder.safetensors'))
        with open(os.path.join(tmp, 'meta.json'), 'w') as f:  # last: marks the checkpoint complete
            json.dump(dict(step=step, world_size=rt.world, space=parts.space, sd_path=parts.sd_path,
                           unet_config=parts.ucfg.to_dict(), text_config=parts.text_config,
                           train_text_encoder=not parts.frozen_text, schedule=parts.diffusion.schedule,
                           prediction=parts.diffusion.prediction, config={k: globals()[k] for k in config_keys}),
                      f, indent=1)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        done = sorted(d for d in os.listdir(ckpt_root)
                      if re.fullmatch(r'step_\d{8}', d) and os.path.isfile(f'{ckpt_root}/{d}/meta.json'))
        for d in done[:-keep_checkpoints] if keep_checkpoints > 0 else []:
            shutil.rmtree(os.path.join(ckpt_root, d))
    dist.barrier()
    log(f'saved checkpoint {final}')
    return final


def export(model, ema, step, parts, rt):
    """Consolidated EMA weights (+ fp32 text conditioner and VAE) for sample.py, written by rank 0: one file with the
    base model's metadata (UNet config with SDXL's adm_in_channels, the text conditioner's config, VAE scale and
    force_upcast), so sample.py and eval.py need no flag for SDXL. The conditioner's default image size becomes the
    training resolution (what sampling conditions on when not told otherwise)."""
    import dataclasses

    from model.conditioner import TextConditioner
    from model.loading import save_jedi, strict_load, strip_prefix
    from model.vae import AutoencoderKL

    path = export_path or os.path.join(out_dir, 'jedi.safetensors')
    full = {}
    for k, v in ema.items():
        v = v.full_tensor()  # a collective: every rank takes part, one tensor at a time
        if rt.master:
            full[k] = v.cpu()
    if rt.master:
        with torch.device('meta'):
            ema_unet = UNet(parts.ucfg)
        ema_unet = ema_unet.to_empty(device='cpu')
        strict_load(ema_unet, strip_prefix(full, 'unet.'), 'UNet')
        # fp32 CPU copies of the text conditioner (its encoder's EMA when trained) and the VAE: the frozen ones may be
        # bf16 on GPU
        frozen = parts.frozen_fp32 or dict(text=parts.text.state_dict() if parts.frozen_text else None,
                                           vae=parts.vae.state_dict() if parts.vae is not None else None)
        if model.text_encoder is not None:  # trained: its EMA, as the conditioner's one encoder
            text_sd = {f'encoders.0.{k}': v for k, v in strip_prefix(full, 'text_encoder.').items()}
        else:
            text_sd = {k: v.float().cpu() for k, v in frozen['text'].items()}
        tcfg = parts.text.config
        if tcfg.micro_conditioning:
            tcfg = dataclasses.replace(tcfg, resolution=resolution)
        out_text = TextConditioner(tcfg, init=False)  # uninitialised memory, filled next
        strict_load(out_text, text_sd, 'text conditioner')
        out_vae = None
        if parts.vae is not None:
            out_vae = AutoencoderKL(parts.vae.config)
            out_vae.load_state_dict({k: v.float().cpu() for k, v in frozen['vae'].items()})
        d = parts.diffusion
        save_jedi(path, ema_unet, out_text, out_vae, resolution=resolution,
                  diffusion=dict(schedule=d.schedule, num_timesteps=d.num_timesteps, beta_start=d.beta_start,
                                 beta_end=d.beta_end, prediction=d.prediction),
                  step=step, ema_decay=ema_decay, steps=sample_steps, guidance=sample_guidance,
                  sampler=sample_sampler, set_sizes=list(set_sizes), dtype=getattr(torch, export_dtype))
    dist.barrier()
    log(f'exported EMA weights at step {step} to {path}')


def build_eval_batch(parts, tokenize, rt):
    """The reference-gain batch: sets of 2 drawn once, with a seed training never uses."""
    import data

    eval_loader = data.build_loader(eval_data_spec or data_spec, resolution=resolution, images_per_batch=2 * eval_sets,
                                    rank=rt.rank, world_size=rt.world, seed=seed + 7919, set_sizes=(2,), num_workers=0)
    x0, ids, context = prepare(next(eval_loader), torch.Generator(rt.dev).manual_seed(seed + rt.rank), parts.vae,
                               parts.text if parts.frozen_text else None, tokenize, rt.dev, rt.compute_dtype)
    return x0, ids if parts.frozen_text else ids[:, 0], context  # a trained encoder takes (B·N, 77)


@torch.no_grad()
def reference_gain(model, eval_batch, diffusion, rt):
    """model.diffusion.reference_gain_sums on the eval batch, summed over ranks -> 1 - own / other."""
    x0, ids, context = eval_batch
    if context is None:  # the text encoder is trained: its current weights
        context = model.text_encoder(input_ids=ids).last_hidden_state
    context = context.to(rt.compute_dtype)  # a tensor or a Cond (context and y)

    def unet(x, t, c, set_size):  # the eval batch is fp32; the model computes in compute_dtype
        return model.unet(x.to(rt.compute_dtype), t, c, set_size=set_size)
    sums = reference_gain_sums(unet, diffusion, x0, context, torch.Generator(rt.dev).manual_seed(seed + rt.rank))
    dist.all_reduce(sums)
    return 1 - (sums[0] / sums[1]).item()


# ----------------------------------------------------------------------------- logging

def mfu_setup(parts, rt):
    """-> (the card's peak FLOP/s or 0 (then no MFU), UNet forward FLOPs per image for a set size, cached)."""
    from flops import peak_bf16_flops, unet_flops

    peak = peak_flops or (peak_bf16_flops(torch.cuda.get_device_name(rt.dev)) if rt.dev.startswith('cuda') else 0.0)
    hw = resolution // (parts.vae.downsample_factor if parts.vae is not None else 1)
    return peak, functools.lru_cache()(lambda n: unet_flops(parts.ucfg, hw, n).per_image() if peak else 0.0)


def tensorboard_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(os.path.join(out_dir, 'tb'))
    except ImportError:
        log('tensorboard is not installed: logging to stdout and train.log only')


def log_progress(step, sums, n_steps, dt, grad_norm, lr, bad, peak, writer, rt):
    """The log line of the last n_steps steps; sums = (loss, sets, images, UNet model FLOPs) over them."""
    l_sum, s_sum, i_sum, f_sum = sums
    msg = (f'step {step} | loss {l_sum / n_steps:.4f} | grad norm {grad_norm:.3f} | lr {lr:.3e} | '
           f'{s_sum / dt:.2f} sets/s | {i_sum / dt:.2f} images/s | {1000 * dt / n_steps:.1f} ms/step')
    if bad:
        msg += f' | {bad:.0f} bad samples skipped'
    if rt.dev.startswith('cuda'):
        msg += f' | peak mem {torch.cuda.max_memory_allocated(rt.dev) / 2**30:.1f} GiB'
        torch.cuda.reset_peak_memory_stats(rt.dev)
    if peak:
        msg += f' | MFU {100 * f_sum / (dt * rt.world * peak):.1f}%'
    log(msg)
    if writer is not None:
        for k, v in (('loss', l_sum / n_steps), ('grad_norm', grad_norm), ('lr', lr), ('images_per_s', i_sum / dt)):
            writer.add_scalar(k, v, step)


# ----------------------------------------------------------------------------- main

def help_text() -> str:
    """--help: how to run it (this module's docstring, first paragraph) and every config key with its default."""
    return (__doc__[:__doc__.index("Config:")].rstrip() + "\n\nconfig keys (defaults; set in config/*.py files or "
            "as --key=value):\n" + configurator.describe(__file__, globals(), config_keys))


def main(argv):
    if any(a in ('-h', '--help') for a in argv):
        print(help_text())
        return
    configure(argv)
    check_config()
    ckpt_root = os.path.join(out_dir, 'ckpt')
    resume_dir = latest_checkpoint(ckpt_root) if init_from == 'resume' else None
    if init_from == 'resume' and resume_dir is None:
        raise SystemExit(f'init_from=resume: no complete checkpoint in {ckpt_root}')
    if init_from != 'resume' and not export_only and latest_checkpoint(ckpt_root):  # never mix two runs' checkpoints
        raise SystemExit(f'{ckpt_root} holds checkpoints of another run: pass --init_from=resume or a new out_dir')
    import data

    rt = setup_distributed()
    world, accum = rt.world, max(1, gradient_accumulation_steps // rt.world)  # accum: micro-batches per rank and step

    # --- the models, sharded, with AdamW and EMA; a resume restores all three and the step
    meta = json.load(open(os.path.join(resume_dir, 'meta.json'))) if resume_dir else {}
    parts = build_parts(meta, resume_dir, rt)  # a bad sd_path stops here, before anything is written
    if rt.master:
        os.makedirs(ckpt_root, exist_ok=True)
    tokenize = caption_tokenizer(parts.text)
    null_ids = parts.text.tokenize([''])[:, 0]  # (1, 77): "" for a trained (SD-1.x) encoder
    # SD-1.x's null is the encoded "", made once; SDXL's carries each image's sizes, so it is made per batch
    null_context = null_text(parts.text) if parts.frozen_text and not parts.text.config.micro_conditioning else None
    model = build_model(parts, null_ids, rt)
    params, optimizer, ema = build_optimizer(model)
    state = TrainState(model, optimizer, ema)
    step, data_state = resume(state, resume_dir, meta, rt) if resume_dir else (0, None)
    n_params = sum(p.numel() for p in params)
    if accum * world != gradient_accumulation_steps:
        log(f'note: gradient_accumulation_steps={gradient_accumulation_steps} is not a multiple of the world size '
            f'{world}: a step takes {accum * world} micro-batches')
    log(f'{init_from}: UNet {parts.ucfg}\n{n_params / 1e6:.2f}M trained parameters, {parts.space} space, '
        f'world {world}, {accum} micro-batch(es) of {images_per_batch} images per rank and step, device {rt.dev}, '
        f'{rt.compute_dtype}')
    if export_only:
        export(model, ema, step, parts, rt)
        dist.destroy_process_group()
        return

    # --- data: loader step = optimizer step × micro-batches per rank, so resuming at any step is exact
    loader = data.build_loader(data_spec, resolution=resolution, images_per_batch=images_per_batch, rank=rt.rank,
                               world_size=world, seed=seed, start_step=0 if overfit_one_batch else step * accum,
                               num_workers=num_workers, state=None if overfit_one_batch else data_state,
                               set_sizes=set_sizes, pin_memory=rt.dev.startswith('cuda'))
    first_batch = next(loader) if overfit_one_batch else None
    eval_batch = build_eval_batch(parts, tokenize, rt) if eval_interval else None
    peak, flops_per_image = mfu_setup(parts, rt)
    writer = tensorboard_writer() if tensorboard and rt.master else None

    signal.signal(signal.SIGTERM, _on_sigterm)
    last_saved = step if resume_dir else None
    interval = torch.zeros(4, dtype=torch.float64)  # loss sum, sets, images, UNet model FLOPs since the last log line
    t_log, n_log = time.perf_counter(), 0
    while step < max_iters:
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group['lr'] = lr
        batches = (micro_batch(first_batch if overfit_one_batch else next(loader), step, micro, parts, tokenize,
                               null_context, rt) for micro in range(accum))
        loss, shapes = forward_backward(model, parts.diffusion, batches, accum)
        grad_norm = clip_gradients(params)
        sets, images = sum(i // n for i, n in shapes), sum(i for i, _ in shapes)
        flops = sum(3 * i * flops_per_image(n) for i, n in shapes)  # forward + backward = 3 forwards
        host = torch.tensor([sets, images, flops, float(_stop_requested), loader.num_bad], dtype=torch.float64,
                            device=rt.dev)
        stats = torch.cat([loss[None], host])
        dist.all_reduce(stats)  # one collective: every rank's loss, the counts, bad samples, whether anyone got SIGTERM
        loss_sum, sets, images, flops, stop, bad = stats.tolist()
        loss_avg, gnorm = loss_sum / world, grad_norm.item()
        if not (math.isfinite(loss_avg) and math.isfinite(gnorm)):
            log(f'stopping: loss {loss_avg} / grad norm {gnorm} at step {step + 1} (the update from step {step}); '
                f'not applied, nothing saved; the last good checkpoint is {latest_checkpoint(ckpt_root)}')
            dist.destroy_process_group()
            sys.exit(1)
        optimizer_step(model, optimizer, ema)
        step += 1

        interval += torch.tensor([loss_avg, sets, images, flops], dtype=torch.float64)
        n_log += 1
        if step % log_interval == 0 or step == max_iters or stop:
            log_progress(step, interval.tolist(), n_log, time.perf_counter() - t_log, gnorm, lr, bad, peak, writer, rt)
            interval.zero_()
            t_log, n_log = time.perf_counter(), 0
        if eval_interval and (step % eval_interval == 0 or step == max_iters):
            log(f'step {step} | ref gain {100 * reference_gain(model, eval_batch, parts.diffusion, rt):.2f}% (loss of '
                f'a generated image with its own set\'s reference vs another set\'s, t = 300/500/700/900)')
        if (ckpt_interval and step % ckpt_interval == 0) or step == max_iters or stop:
            save_checkpoint(state, step, parts, loader, rt)
            last_saved = step
        if stop:
            log(f'SIGTERM: stopped after saving step {step}')
            dist.destroy_process_group()
            return
    if last_saved != step:  # e.g. resumed at or past max_iters
        save_checkpoint(state, step, parts, loader, rt)
    export(model, ema, step, parts, rt)
    if writer is not None:
        writer.close()
    dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1:])
