# The S³ data engine as the paper made its collages (§3.1): SDXL base at 1024², prompt + ", photos of the same".
# The other stages as config/s3_sd15.py (the paper's "stable diffusion inpainting model" and InstructPix2Pix).
# Download the weights yourself into weights/ (docs/s3.md lists each file, its layout and where it is published).
#   python s3.py all config/s3_sdxl.py                                   # one GPU
#   torchrun --standalone --nproc_per_node=8 s3.py all config/s3_sdxl.py  # 8 GPUs, each a disjoint share
manifest = 'data/s3_sdxl'
prompts_per_object = 64  # x 307 built-in objects = 19,648 collages
sd = 'weights/sd_xl_base_1.0.safetensors'  # Stability's single file (or the diffusers folder): SDXL from its keys
collage_suffix = 'photos of the same'
collage_resolution = 1024  # SDXL's own size; also its size conditioning (original = target = 1024, crop 0)
collage_steps = 30
collage_guidance = 5.0  # diffusers' StableDiffusionXLPipeline default (the paper gives no scale)
dtype = 'bfloat16'  # bf16 autocast on CUDA (fp16 would overflow SDXL's VAE); CPU runs float32
batch_size = 8  # collages per batch: one UNet call of 16 (CFG) at 128x128 latents per step
sampler = 'dpmpp_2m'
grounding_dino = 'weights/grounding-dino-base'
sam = 'weights/sam-vit-huge'
clip_model = 'ViT-L-14-quickgelu'
clip_weights = 'weights/ViT-L-14.pt'
min_similarity = 0.95
# backgrounds: SD-1.5 inpainting at 512², as the paper ("the stable diffusion inpainting model") and what a 512 px
# JeDi (config/jedi_sd14.py) trains on. For 1024² sets, SDXL inpainting (9 channels, the same input order):
#   inpaint = 'weights/stable-diffusion-xl-1.0-inpainting-0.1'   # the diffusers folder
#   canvas = 1024
inpaint = 'weights/sd-v1-5-inpainting.ckpt'
canvas = 512
inpaint_steps = 30
ip2p = 'weights/instruct-pix2pix'
stylize_p = 0.5
ip2p_steps = 20
