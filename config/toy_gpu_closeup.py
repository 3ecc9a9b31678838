# Stage 2 of the GPU toy (config/toy_gpu.py): resume on sets that mix in close-ups, as config/toy_closeup.py does
# for the CPU recipe (docs/toy.md: close-ups are what opened the reference route), and export.
#   python train.py config/toy.py config/toy_gpu.py config/toy_gpu_closeup.py
# toy/gpu_train.sh overrides max_iters with what the measured step time of stage 1 leaves in the budget.
init_from = 'resume'
export_path = 'out/toy_gpu/jedi.safetensors'  # not assets/: the shipped default changes only if this model is better
data_spec = 'procedural?closeup=0.4'
eval_data_spec = 'procedural-heldout?closeup=0.25'  # as the CPU recipe's stage 2: logs comparable with its runs
max_iters = 3600  # 2,400 steps after stage 1's 1,200: the cosine schedule restarts at its 1.2k-of-3.6k value
