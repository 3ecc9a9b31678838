# The S³ data engine (paper §3.1) on public SD-1.5-family checkpoints. Download the weights yourself into
# weights/ (docs/s3.md lists each file, its layout and where it is published); nothing is fetched at run time.
#   python s3.py all config/s3_sd15.py                                   # one GPU
#   torchrun --standalone --nproc_per_node=8 s3.py all config/s3_sd15.py  # 8 GPUs, each a disjoint share
manifest = 'data/s3'
prompts_per_object = 64  # x 307 built-in objects = 19,648 collages
sd = 'weights/v1-5-pruned-emaonly.safetensors'
collage_resolution = 512
collage_steps = 30
collage_guidance = 7.5
grounding_dino = 'weights/grounding-dino-base'
sam = 'weights/sam-vit-huge'
clip_model = 'ViT-L-14-quickgelu'
clip_weights = 'weights/ViT-L-14.pt'  # OpenAI's archive; the 0.95 threshold is the paper's, its CLIP unnamed
min_similarity = 0.95
inpaint = 'weights/sd-v1-5-inpainting.ckpt'
canvas = 512
inpaint_steps = 30
ip2p = 'weights/instruct-pix2pix'  # the diffusers folder of timbrooks/instruct-pix2pix (or its .safetensors)
stylize_p = 0.5
ip2p_steps = 20
batch_size = 8
sampler = 'dpmpp_2m'
