import os

import torch

# Triton decides interpreter vs compiler when `triton` is first imported (e.g. by diffusers) and when each
# @triton.jit function is defined, so this must happen before any test module is imported: without a GPU the
# Triton kernels run under the interpreter on CPU tensors. An explicit TRITON_INTERPRET setting wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
