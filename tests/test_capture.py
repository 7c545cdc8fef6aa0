"""capture(): rows against eager attention maps, hidden states and logits against HF's own outputs, per family."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import sra_distill.models.capture as capture_module
from sra_distill.data.batch import last_real_position
from sra_distill.data.tokenization import load_tokenizer
from sra_distill.models.capture import (
    LEAN_ATTENTION,
    capture,
    last_query_attention_row,
    lean_attention_forward,
)

TEXTS = [
    "Distillation moves knowledge from a teacher to a student, one span at a time.",
    "Hi there",
    "The cat sat on the mat and watched the rain.",
]
SMALL = dict(num_hidden_layers=3, num_attention_heads=4)


def _llama(vocab):
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, vocab_size=vocab, **SMALL)
    return LlamaForCausalLM, config


def _qwen2(vocab):  # blocks 1-2 use a 4-token sliding window
    config = Qwen2Config(
        hidden_size=32, intermediate_size=64, num_key_value_heads=2, vocab_size=vocab,
        use_sliding_window=True, sliding_window=4, max_window_layers=1, **SMALL,
    )
    return Qwen2ForCausalLM, config


def _mistral(vocab):
    config = MistralConfig(
        hidden_size=32, intermediate_size=64, num_key_value_heads=2, vocab_size=vocab, sliding_window=4, **SMALL
    )
    return MistralForCausalLM, config


def _gpt2(vocab):
    return GPT2LMHeadModel, GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, vocab_size=vocab)


def _opt(vocab):
    config = OPTConfig(
        hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64, vocab_size=vocab, **SMALL
    )
    return OPTForCausalLM, config


def _gpt_neox(vocab):
    return GPTNeoXForCausalLM, GPTNeoXConfig(hidden_size=32, intermediate_size=64, vocab_size=vocab, **SMALL)


# family -> (model factory, real tokenizer of that family, dotted path of the final norm)
FAMILIES = {
    "llama": (_llama, "smollm2", "model.norm"),
    "qwen2": (_qwen2, "qwen1.5", "model.norm"),
    "mistral": (_mistral, "mistral", "model.norm"),
    "gpt2": (_gpt2, "gpt2", "transformer.ln_f"),
    "opt": (_opt, "gpt2", "model.decoder.final_layer_norm"),
    "gpt_neox": (_gpt_neox, "gpt-neox", "gpt_neox.final_layer_norm"),
}


def build(family: str, dtype=torch.float32):
    make, tokenizer_name, _ = FAMILIES[family]
    tokenizer = load_tokenizer(tokenizer_name)
    torch.manual_seed(0)
    model_class, config = make(len(tokenizer))
    model = model_class._from_config(config, attn_implementation="eager", dtype=dtype).eval()
    return model, tokenizer


def encode(tokenizer, side: str):
    enc = tokenizer(TEXTS, padding=True, padding_side=side, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # the batch really is padded
    return enc["input_ids"], enc["attention_mask"]


def run_as(model, implementation: str, **kwargs):
    """Plain HF forward under `implementation`, restoring the model's own setting afterwards."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        with torch.no_grad():
            return model(use_cache=False, **kwargs)
    finally:
        model.set_attn_implementation(previous)


def eager_rows(model, input_ids, attention_mask):
    """Reference: full eager maps, row of the last non-pad query, summed over heads -> one [B, T] per layer."""
    out = run_as(model, "eager", input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    last = [int(torch.nonzero(row).max()) for row in attention_mask]
    return [torch.stack([maps[b, :, last[b], :].sum(0) for b in range(len(last))]) for maps in out.attentions]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request):
    model, tokenizer = build(request.param)
    return request.param, model, tokenizer


@pytest.mark.parametrize("side", ["left", "right"])
def test_attention_rows_equal_eager_maps(family_model, side):
    _, model, tokenizer = family_model
    input_ids, attention_mask = encode(tokenizer, side)
    reference = eager_rows(model, input_ids, attention_mask)
    with torch.no_grad():
        view = capture(model, input_ids, attention_mask, attention_layers=(0, 1, 2), logits=False)
    for layer in range(3):
        row = view.attention_row[layer]
        assert row.shape == input_ids.shape  # [B, T], no [B, H, T, T] survives
        torch.testing.assert_close(row, reference[layer], atol=1e-5, rtol=0)
        # each head's row is a distribution over unmasked keys
        torch.testing.assert_close(row.sum(-1), torch.full((len(TEXTS),), 4.0), atol=1e-5, rtol=0)
        assert not bool(row[attention_mask == 0].any())
    assert model.config._attn_implementation == "eager"  # restored


def test_hidden_states_and_logits_match_hf(family_model):
    family, model, tokenizer = family_model
    input_ids, attention_mask = encode(tokenizer, "right")
    sdpa = run_as(model, "sdpa", input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    with torch.no_grad():
        view = capture(model, input_ids, attention_mask, hidden_layers=(0, 1, 2, -1), attention_layers=(1,))
    # the lean attention leaves the model's output unchanged
    torch.testing.assert_close(view.logits, sdpa.logits, atol=1e-5, rtol=0)
    # HF: hidden_states[i + 1] = output of block i for inner blocks, hidden_states[-1] = final-norm output
    for block in (0, 1):
        torch.testing.assert_close(view.hidden[block], sdpa.hidden_states[block + 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(view.hidden[3], sdpa.hidden_states[-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(view.last_hidden, view.hidden[3])
    # the last block's output is what the final norm reads
    final_norm = model.get_submodule(FAMILIES[family][2])
    with torch.no_grad():
        torch.testing.assert_close(final_norm(view.hidden[2]), view.hidden[3], atol=1e-5, rtol=0)
        torch.testing.assert_close(view.last_hidden @ view.lm_head_weight.T, view.logits, atol=1e-5, rtol=0)
    assert set(view.hidden) == {0, 1, 2, 3} and set(view.attention_row) == {1}
    assert view.num_layers == 3 and view.lm_head_weight is model.get_output_embeddings().weight


def test_logits_false_skips_the_head(family_model):
    _, model, tokenizer = family_model
    input_ids, attention_mask = encode(tokenizer, "left")
    head_calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *args: head_calls.append(1))
    try:
        with torch.no_grad():
            lean = capture(model, input_ids, attention_mask, hidden_layers=(-1,), logits=False)
            full = capture(model, input_ids, attention_mask, hidden_layers=(-1,), logits=True)
    finally:
        handle.remove()
    assert lean.logits is None and full.logits is not None
    assert len(head_calls) == 1  # only the logits=True pass applied the head
    torch.testing.assert_close(lean.last_hidden, full.last_hidden, atol=0, rtol=0)


def test_no_attention_maps_are_returned_by_any_layer():
    model, tokenizer = build("llama")
    input_ids, attention_mask = encode(tokenizer, "right")
    returned = []
    handles = [
        layer.self_attn.register_forward_hook(lambda module, args, out: returned.append(out[1]))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        view = capture(model, input_ids, attention_mask, hidden_layers=(-1,), attention_layers=(2,))
    for handle in handles:
        handle.remove()
    assert returned == [None, None, None]
    assert [tuple(r.shape) for r in view.attention_row.values()] == [tuple(input_ids.shape)]


def test_student_gradients_flow_and_rows_are_detached():
    model, tokenizer = build("gpt2")
    model.train()
    input_ids, attention_mask = encode(tokenizer, "right")
    view = capture(model, input_ids, attention_mask, hidden_layers=(1, -1), attention_layers=(-1,))
    assert view.hidden[1].requires_grad and view.last_hidden.requires_grad and view.logits.requires_grad
    assert not view.attention_row[3].requires_grad
    (view.hidden[1].pow(2).mean() + view.last_hidden.pow(2).mean()).backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0
    assert model.transformer.ln_f.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_recomputes_outside_the_capture():
    model, tokenizer = build("llama")
    model.activation_checkpointing_enable()
    model.train()
    input_ids, attention_mask = encode(tokenizer, "left")
    with pytest.raises(ValueError, match="set_attn_implementation"):
        capture(model, input_ids, attention_mask, hidden_layers=(-1,))
    model.set_attn_implementation(LEAN_ATTENTION)
    view = capture(model, input_ids, attention_mask, hidden_layers=(-1,), attention_layers=(0,))
    view.last_hidden.sum().backward()  # recomputed blocks run the lean function with no active request
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_peft_lora_model_is_unwrapped():
    from peft import LoraConfig, get_peft_model

    model, tokenizer = build("llama")
    input_ids, attention_mask = encode(tokenizer, "right")
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    view = capture(lora, input_ids, attention_mask, hidden_layers=(-1,), attention_layers=(1,))
    with torch.no_grad():
        direct = lora(input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(view.logits, direct.logits, atol=1e-5, rtol=0)
    reference = eager_rows(lora.get_base_model(), input_ids, attention_mask)
    torch.testing.assert_close(view.attention_row[1], reference[1], atol=1e-5, rtol=0)
    view.logits.pow(2).mean().backward()
    lora_grads = [p.grad for name, p in lora.named_parameters() if "lora_" in name]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_bf16_teacher_stays_bf16():
    model, tokenizer = build("qwen2", dtype=torch.bfloat16)
    input_ids, attention_mask = encode(tokenizer, "left")
    reference = eager_rows(model, input_ids, attention_mask)
    with torch.no_grad():
        view = capture(model, input_ids, attention_mask, hidden_layers=(-1,), attention_layers=(2,), logits=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert view.last_hidden.dtype == torch.bfloat16
    torch.testing.assert_close(view.attention_row[2], reference[2].float(), atol=2e-2, rtol=0)


def test_fallback_to_eager_maps_warns_and_matches(monkeypatch):
    model, tokenizer = build("gpt_neox")
    model.set_attn_implementation("sdpa")
    input_ids, attention_mask = encode(tokenizer, "left")
    reference = eager_rows(model, input_ids, attention_mask)
    monkeypatch.setattr(capture_module, "serves_lean_attention", lambda lm: False)
    with pytest.warns(UserWarning, match="AttentionInterface"), torch.no_grad():
        view = capture(model, input_ids, attention_mask, attention_layers=(0, -1))
    torch.testing.assert_close(view.attention_row[0], reference[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(view.attention_row[3], reference[2], atol=1e-5, rtol=0)
    assert model.config._attn_implementation == "sdpa"


def test_lean_attention_outside_capture_is_sdpa():
    model, tokenizer = build("mistral")
    input_ids, attention_mask = encode(tokenizer, "left")
    sdpa = run_as(model, "sdpa", input_ids=input_ids, attention_mask=attention_mask)
    lean = run_as(model, LEAN_ATTENTION, input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(lean.logits, sdpa.logits, atol=0, rtol=0)


def plain_attention(query, key, value, mask, scaling, softcap):
    """Reference written out: repeat kv heads, softcap, additive mask, softmax, weights @ values."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
    scores = query @ key.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    weights = (scores + mask).softmax(-1)
    return weights @ value, weights


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_row_formula_with_gqa_softcap_and_float_mask(softcap):
    torch.manual_seed(1)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 6, 8
    query = torch.randn(batch, heads, length, dim)
    key, value = torch.randn(batch, kv_heads, length, dim), torch.randn(batch, kv_heads, length, dim)
    padding = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    allowed = torch.ones(length, length).tril().bool() & padding[:, None, None, :].bool()
    allowed = allowed | torch.eye(length, dtype=torch.bool)  # keep every query row non-empty
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    output, weights = plain_attention(query, key, value, additive, 0.3, softcap)
    last = last_real_position(padding)
    assert last.tolist() == [5, 3]
    expected = weights[torch.arange(batch), :, last].sum(1)
    for mask in (additive, allowed):
        row = last_query_attention_row(query, key, mask, last, 0.3, softcap)
        torch.testing.assert_close(row, expected, atol=1e-6, rtol=0)
    module = nn.Module()
    module.layer_idx, module.num_key_value_groups = 0, heads // kv_heads
    module.eval()
    out, none = lean_attention_forward(module, query, key, value, allowed, scaling=0.3, softcap=softcap)
    assert none is None
    torch.testing.assert_close(out, output.transpose(1, 2), atol=1e-5, rtol=0)


def test_bad_inputs_name_the_problem():
    model, tokenizer = build("gpt2")
    input_ids, attention_mask = encode(tokenizer, "right")
    with pytest.raises(ValueError, match="attention_mask shape"):
        capture(model, input_ids, attention_mask[:, :-1])
    empty = attention_mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="non-pad"):
        capture(model, input_ids, empty)
    with pytest.raises(ValueError, match="hidden layer 7 out of range"):
        capture(model, input_ids, attention_mask, hidden_layers=(7,))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\]"):
        capture(model, input_ids[0], attention_mask[0])
    with pytest.raises(TypeError, match="ForCausalLM"):
        capture(model.transformer, input_ids, attention_mask)
    with pytest.raises(TypeError, match="ForCausalLM"):
        capture(nn.Linear(2, 2), input_ids, attention_mask)
