import os

# Tests never reach the model hub; caches go to a per-session temporary folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
