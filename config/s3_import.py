# The S³ engine from collages made elsewhere (the paper used SDXL, which our stack does not load): put x.png and
# x.json {"prompt": ..., "object": ...} (or x.txt with the prompt) in collages_from, then
#   python s3.py all config/s3_sd15.py config/s3_import.py
# `all` then skips the prompts stage: the collages come with their prompts.
collages_from = 'data/sdxl_collages'
manifest = 'data/s3_sdxl'
