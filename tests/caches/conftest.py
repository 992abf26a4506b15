"""Cache tests run many tiny decodes: one intra-op thread is faster than two threads fighting for shared cores."""

import torch

torch.set_num_threads(1)
