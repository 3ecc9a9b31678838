# Stage 2 of the toy model: continue config/toy.py's run on sets that mix in close-ups of the subject.
#   python train.py config/toy.py                          (stage 1: 4k steps, ~34 min on 2 cores)
#   python train.py config/toy.py config/toy_closeup.py    (stage 2: from step 4k, 8.5k more steps, ~67 min)
# Why: a close-up (subject large and centred, caption "close up") given as the reference makes the coupled
# self-attention worth using at once: even attention spread evenly over the reference returns the subject's
# colour and pattern, so the route from reference to new image gets a gradient before it is content-selective.
# Stage 1's sets (subject ~1/9 of the frame) give that route almost nothing to find
# (docs/toy.md). Close-up references are also what people give (subject-centric
# photos), and the toy benchmark uses them by default.
init_from = 'resume'
export_path = 'assets/jedi_toy.safetensors'  # what sample.py loads without --ckpt
data_spec = 'procedural?closeup=0.4'  # each image of a set is a close-up with probability 0.4
eval_data_spec = 'procedural-heldout?closeup=0.25'  # kept at 1/4: comparable with earlier runs' logs
max_iters = 12500  # the cosine schedule restarts at its 4k-of-12.5k value (~8.0e-4) and decays to min_lr
eval_sets = 48  # the reference gain logged every eval_interval steps; 16 sets are too noisy to follow it
eval_interval = 1000  # each 48-set evaluation costs ~6 s
