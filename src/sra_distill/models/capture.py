"""Run a causal LM once and keep only what the losses asked for: a `ModelView`.

* Hidden states: forward hooks on the chosen decoder blocks (output of block i) and on the LM head's input (the
  final-norm output, index `num_layers`); nothing else is kept, so under `no_grad` the other layers' states are freed
  as the pass goes. With `logits=False` the base model runs alone and the head is never applied to the sequence.
* Attention row of the last non-pad token, summed over heads, without [B, H, T, T] maps. The model runs under the
  `"sra_lean"` attention function, registered in transformers' `AttentionInterface`: every layer's output comes from
  `scaled_dot_product_attention` (exactly HF's `sdpa` path), and only the chosen layers (by `module.layer_idx`) also
  compute one extra query row per example:

      row_b = sum_h softmax_k( s_h(q_{h, last_b} . k_{h', k} * scaling) + mask_b[last_b, k] ),   h' = h // (H / H_kv)

  with `s` the tanh soft-cap where the family passes one (`softcap`), the layer's own `scaling`, and the layer's
  4D mask (causal, padding, sliding window) as the model built it. `last_b` = last position with attention_mask 1,
  so left and right padding both work. Cost per chosen layer: one [B, H, T] product instead of [B, H, T, T] maps.
  The row is the pre-dropout distribution (the attention the token pays, not a dropout sample) and is detached.

A data-parallel wrapper (accelerate-prepared DDP, FSDP1) is accepted: hooks go on the model inside, but the
forward runs through the wrapper, which is what synchronises gradients (DDP) or gathers shards (FSDP).

`capture` switches the model to this implementation for the pass and restores the previous one after. A model with
activation checkpointing must be switched for good first (`model.set_attn_implementation("sra_lean")`): backward
recomputes its blocks after `capture` has returned, and they must run the same attention as the forward pass did;
outside `capture` the function is plain SDPA, so the model behaves as under `"sdpa"`.

Families whose attention does not go through `AttentionInterface` (older remote-code models) fall back, with a
warning, to eager attention and `output_attentions=True`; the maps are reduced to rows as soon as the pass ends.
Llama (SmolLM2, TinyLlama), Qwen2, Mistral, GPT-2, OPT and GPT-NeoX all take the lean path in transformers 5.

Source of the quantity: SRA (arXiv 2605.01205) token mass = attention received from the last non-pad token.
"""

from __future__ import annotations

import contextlib
import warnings
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from sra_distill.data.batch import ModelView, last_real_position

LEAN_ATTENTION = "sra_lean"


@dataclass
class _RowRequest:
    """What the running capture wants from the attention function: which layers, which query per example."""

    layers: frozenset[int]
    last_index: torch.Tensor  # [B], position of the last non-pad token
    rows: dict[int, torch.Tensor] = field(default_factory=dict)


# Set only while `capture` runs, so the registered function is plain SDPA anywhere else (e.g. when gradient
# checkpointing recomputes a block during backward, or when generation runs under this implementation).
_ACTIVE_REQUEST: ContextVar[_RowRequest | None] = ContextVar("sra_active_row_request", default=None)


def last_query_attention_row(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    last_index: torch.Tensor,
    scaling: float | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of query `last_index[b]` over all keys, summed over heads: [B, S] (float32, no grad).

    query [B, H, T, d], key [B, H_kv, S, d]; attention_mask: the layer's 4D mask [B or 1, 1 or H, T, S], boolean
    (True = attend) or additive float, or None when HF left it out, which it only does for an unpadded causal batch
    without an active window: then the last query sees every key.
    """
    batch, heads, _, head_dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    rows = torch.arange(batch, device=query.device)
    with torch.no_grad():
        q_last = query[rows, :, last_index].float()  # [B, H, d]
        # Grouped-query heads: head h reads kv head h // n_rep (HF's repeat_kv order), without repeating the keys.
        q_grouped = q_last.view(batch, kv_heads, heads // kv_heads, head_dim)
        scores = (q_grouped @ key.float().transpose(-1, -2)).view(batch, heads, n_keys)
        scores = scores * (head_dim**-0.5 if scaling is None else scaling)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            mask_rows = attention_mask.expand(batch, -1, -1, -1)[rows, :, last_index]  # [B, 1 or H, S]
            if mask_rows.dtype == torch.bool:
                scores = scores.masked_fill(~mask_rows, float("-inf"))
            else:
                scores = scores + mask_rows.float()
        return scores.softmax(dim=-1).sum(dim=1)


def _softcapped_attention(module, query, key, value, attention_mask, scaling, dropout, softcap):
    """Layer output for families with attention-logit soft-capping, which SDPA cannot express (Gemma-2 style)."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    scores = torch.tanh(query @ key.transpose(-1, -2) * scaling / softcap) * softcap
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool else (
            scores + attention_mask
        )
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), None


def lean_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF attention-interface function: SDPA output, plus the last-query row for the layers a capture asked for."""
    request = _ACTIVE_REQUEST.get()
    softcap = kwargs.get("softcap")
    layer = getattr(module, "layer_idx", None)  # transformers' attention modules carry one in most architectures
    if request is not None and layer in request.layers:
        request.rows[layer] = last_query_attention_row(
            query, key, attention_mask, request.last_index, scaling, softcap
        )
    if softcap is not None:
        head_scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        return _softcapped_attention(module, query, key, value, attention_mask, head_scaling, dropout, softcap)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


# Registered once at import: the attention function, and SDPA's boolean mask builder under the same name (without
# a mask function of its own, HF would build no mask at all for an unknown implementation).
AttentionInterface.register(LEAN_ATTENTION, lean_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(LEAN_ATTENTION, sdpa_mask)


def causal_lm_of(model: nn.Module) -> PreTrainedModel:
    """The HF causal LM inside `model`: itself, or the model a peft wrapper (LoRA...) injected its adapters into."""
    from peft import PeftModel  # local: peft is heavy to import and only needed here

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    if not isinstance(model, PreTrainedModel) or model.get_output_embeddings() is None or model.base_model is model:
        raise TypeError(
            f"capture needs a transformers *ForCausalLM (optionally peft-wrapped), got {type(model).__name__}"
        )
    return model


def decoder_blocks(model: PreTrainedModel) -> list[nn.Module]:
    """The model's decoder blocks in order, found by the block class HF names in `_no_split_modules`."""
    block_classes = set(model._no_split_modules or ())
    # By the class's ancestry, not its name alone: FSDP2 (`fully_shard`) swaps a block's class for an FSDP subclass.
    blocks = [m for m in model.modules() if any(c.__name__ in block_classes for c in type(m).__mro__)]
    num_layers = model.config.get_text_config().num_hidden_layers
    if len(blocks) != num_layers:
        raise ValueError(
            f"{type(model).__name__}: found {len(blocks)} blocks of classes {sorted(block_classes)}, expected "
            f"num_hidden_layers={num_layers}; this model's layout is not supported by capture"
        )
    return blocks


def last_block_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of the last decoder block of `model` (a causal LM, peft-wrapped or not): where
    GradMag (`train/weighting.py`) measures each loss term's gradient."""
    params = [p for p in decoder_blocks(causal_lm_of(model))[-1].parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student's last decoder block has no trainable parameter (LoRA targets none of its "
                         "modules?), so balance=gradmag has nothing to measure there; use balance=alpha")
    return params


def _canonical_layers(layers: Sequence[int], num_layers: int, what: str) -> tuple[int, ...]:
    """Map -1 to num_layers and check the range [0, num_layers]."""
    canonical = []
    for layer in layers:
        index = num_layers if layer == -1 else layer
        if not 0 <= index <= num_layers:
            raise ValueError(
                f"{what} layer {layer} out of range for a model with {num_layers} blocks (use 0..{num_layers} or -1)"
            )
        canonical.append(index)
    return tuple(sorted(set(canonical)))


def _first_tensor(output) -> torch.Tensor:
    # Decoder blocks return a tensor (Llama family) or a tuple whose first item is the hidden states (GPT-2, OPT).
    return output if isinstance(output, torch.Tensor) else output[0]


@contextlib.contextmanager
def _attention_implementation(model: PreTrainedModel, implementation: str) -> Iterator[None]:
    previous = model.config._attn_implementation
    if previous != implementation:
        if model.is_activation_checkpointing and torch.is_grad_enabled():
            raise ValueError(
                f"{type(model).__name__} uses activation checkpointing with {previous!r} attention: recomputation in "
                f"backward would run a different attention than capture; call "
                f"model.set_attn_implementation({LEAN_ATTENTION!r}) once first"
            )
        model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)


def serves_lean_attention(model: PreTrainedModel) -> bool:
    """Whether the model's attention goes through HF's AttentionInterface (so `"sra_lean"` can replace it)."""
    return bool(model._supports_attention_backend) and type(model)._can_set_attn_implementation()


def _check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape {tuple(input_ids.shape)}"
        )
    if not bool((attention_mask != 0).any(dim=1).all()):
        raise ValueError("every example needs at least one non-pad token (attention_mask row of zeros)")


def capture(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    hidden_layers: Sequence[int] = (),
    attention_layers: Sequence[int] = (),
    logits: bool = True,
) -> ModelView:
    """One forward pass of `model` (HF causal LM, possibly peft-wrapped) reduced to a `ModelView`.

    hidden_layers / attention_layers: block indices i (output / attention of block i), `num_layers` or -1 for the
    final-norm output; keys of the result use `num_layers` for -1. The attention row of `num_layers` is the last
    block's (the final norm has no attention of its own). Gradients flow to the hidden states and logits when the
    caller has grad enabled; run the teacher under `torch.no_grad()`. Dtypes are left as they are (bf16 teacher).
    """
    _check_inputs(input_ids, attention_mask)
    inner = extract_model_from_parallel(model)
    lm = causal_lm_of(inner)
    # Through the wrapper when there is one: bypassing DDP's forward would silently skip the gradient all-reduce.
    run_model = lm if inner is model else model
    num_layers = lm.config.get_text_config().num_hidden_layers
    hidden_keys = _canonical_layers(hidden_layers, num_layers, "hidden")
    attention_keys = _canonical_layers(attention_layers, num_layers, "attention")
    # Attention is read inside blocks: the final norm's key reads the last block.
    attention_blocks = frozenset(min(k, num_layers - 1) for k in attention_keys)

    blocks = decoder_blocks(lm)
    hidden: dict[int, torch.Tensor] = {}

    def keep_block_output(index: int):
        return lambda module, args, output: hidden.__setitem__(index, _first_tensor(output))

    def keep_head_input(module, args):
        hidden[num_layers] = args[0]

    head_outputs: list[torch.Tensor] = []

    def keep_head_output(module, args, output):
        head_outputs.append(output)

    handles = [blocks[i].register_forward_hook(keep_block_output(i)) for i in hidden_keys if i < num_layers]
    if logits and num_layers in hidden_keys:
        handles.append(lm.get_output_embeddings().register_forward_pre_hook(keep_head_input))
    if logits:
        handles.append(lm.get_output_embeddings().register_forward_hook(keep_head_output))

    lean = serves_lean_attention(lm)
    request = _RowRequest(attention_blocks, last_real_position(attention_mask))
    eager_maps = bool(attention_blocks) and not lean
    if eager_maps:
        warnings.warn(
            f"{type(lm).__name__} does not route attention through transformers' AttentionInterface: attention rows "
            f"come from full eager attention maps (more memory)",
            stacklevel=2,
        )
    forward_kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if eager_maps:
        forward_kwargs["output_attentions"] = True
    implementation = "eager" if eager_maps else LEAN_ATTENTION if lean else lm.config._attn_implementation
    token = _ACTIVE_REQUEST.set(request)
    try:
        with _attention_implementation(lm, implementation):
            if logits:
                outputs = run_model(**forward_kwargs)
                token_logits = outputs.logits
            else:
                # Base model only: the LM head is never applied to the sequence.
                if run_model is not lm and torch.is_grad_enabled():
                    raise ValueError("capture(logits=False) runs the base model alone, bypassing the data-parallel "
                                     "wrapper; with gradients that would skip their synchronisation")
                outputs = lm.base_model(**forward_kwargs)
                token_logits = None
                if num_layers in hidden_keys:
                    hidden[num_layers] = outputs.last_hidden_state
    finally:
        _ACTIVE_REQUEST.reset(token)
        for handle in handles:
            handle.remove()

    if eager_maps:
        if outputs.attentions is None:
            raise RuntimeError(f"{type(lm).__name__} returned no attention maps under eager attention")
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        with torch.no_grad():
            request.rows = {
                i: outputs.attentions[i][rows, :, request.last_index].float().sum(1) for i in attention_blocks
            }
    missing = attention_blocks - request.rows.keys()
    if missing:
        raise RuntimeError(
            f"{type(lm).__name__}: no attention row captured for blocks {sorted(missing)} (attention modules "
            f"without layer_idx?)"
        )
    head = lm.get_output_embeddings()
    from_head = token_logits is not None and len(head_outputs) == 1 and _same_values(token_logits, head_outputs[0])
    return ModelView(
        hidden={k: hidden[k] for k in hidden_keys},
        attention_row={k: request.rows[min(k, num_layers - 1)] for k in attention_keys},
        logits=token_logits,
        lm_head_weight=head.weight,
        lm_head_bias=head.bias,
        num_layers=num_layers,
        input_embedding_weight=lm.get_input_embeddings().weight,
        logits_from_head=from_head,
    )


def _same_values(logits: torch.Tensor, head_output: torch.Tensor) -> bool:
    """Whether the model returned its head's output as it is, or only converted its dtype (accelerate's mixed
    precision wraps `forward` to return float32 copies); anything else (soft-capping, scaling) makes a new tensor."""
    if logits is head_output:
        return True
    step = logits.grad_fn
    return (
        step is not None and type(step).__name__ == "ToCopyBackward0" and logits.shape == head_output.shape
        and step.next_functions[0][0] is head_output.grad_fn
    )
