"""Test-wide settings: quiet third-party progress bars and one intra-op thread.

Tiny models are dominated by per-op overhead; on a 2-core machine one thread is both faster and
steadier than two fighting over the cores, and keeps float reductions in a fixed order.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402

torch.set_num_threads(1)
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
