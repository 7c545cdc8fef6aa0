import os

# Tests never reach the model hub; caches go to a per-session temporary folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gpt2_tok():
    from sra_distill.data.tokenization import load_tokenizer

    return load_tokenizer("gpt2")


@pytest.fixture(scope="session")
def tiny_gpt2():
    """Builds a tiny random GPT-2 over the gpt2 vocabulary, in eval mode, seeded with 0; `initializer_range` sets how
    spread (confident) its logits are."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    def build(initializer_range: float):
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=2, n_positions=600,
                            initializer_range=initializer_range)
        return GPT2LMHeadModel(config).eval()

    return build


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models and matrices gain nothing from threads, and on a busy 2-core machine OpenMP spin-waiting makes
    each pass 10-50x slower. A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
