"""The losses on the student's token logits, with their backward written out: the next-token cross-entropy every
run trains on, and SRA's span KL when its student span logits are pooled from those same token logits.

    CE = (1/n) sum_{(b,t) labelled} (logsumexp_v z_btv - z_bt,y_bt)        y_bt = labels[b, t+1], n = labelled rows
    dCE/dz_bt = (softmax(z_bt) - onehot(y_bt)) / n on labelled rows, 0 on the others

Why not `F.cross_entropy(logits[:, :-1])`: that holds a shifted float32 copy of the [B, T, V] logits and their
log-softmax between the passes, and its backward goes through three more [B, T, V] tensors (the NLL's gradient, the
log-softmax's, the slice's). Here the forward keeps only a logsumexp per labelled row (the logits themselves are the
caller's tensor), and the backward writes the gradient once, into one [B, T, V] float32 tensor, a chunk of rows at a
time. Values and gradients equal F.cross_entropy's to float32 rounding (tests/test_logit_losses.py).

The span KL (`losses/fused_span_kl.py` for its formula): with a bias-free student head whose input pools into the
centres, z^S_k = sum_{t in k} a_t z_t[shared], so dL_kl/dz_t = a_t g_k on the shared columns, g_k = (q_k - p_k) / (tau D).
`ce_and_span_kl` computes the CE and the span KL in one autograd node. Its forward adds a_t g_k into a zero
[B, T, V] float32 tensor as it goes over the spans (nothing is kept per span); its backward turns that tensor into the
whole gradient in place, grad_kl times it plus the CE's part, a chunk of rows at a time, and hands it to autograd. So
the span KL takes no memory beyond what the CE's gradient takes anyway, costs no product with the student's head and
no [V, D] gradient of its own (the head's one backward product carries both), and nothing depends on the order in
which autograd accumulates gradients: both terms' gradients are written by this one node. A second backward through
a retained graph finds the tensor used up and computes the KL's part again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sra_distill.data.batch import next_token_targets
from sra_distill.losses.fused_span_kl import SharedHead, product_dtype

ROWS_PER_CHUNK = 128  # logit rows per chunk: 128 x 50k ids x 4 bytes = 26 MB per float32 temporary
SPAN_CHUNK = 64  # spans per chunk of the span KL (at most): a few [64, V_shared] float32 temporaries, ~10 MB each
PRODUCT_ROWS = 1024  # shared head rows per float32 product (`shared_head_product`): 1024 x 576 x 4 = 2.4 MB


@dataclass(frozen=True)
class SpanTokens:
    """Which student tokens make up which span, and with which pooling weight a_t (C_k = sum_{t in k} a_t h_t).

    positions [M]: flat index b * T + t of each token; spans [M]: its span, 0..N-1, non-decreasing; weights [M]:
    a_t (float32). Every span has at least one token.
    """

    positions: torch.Tensor
    spans: torch.Tensor
    weights: torch.Tensor
    num_spans: int

    def chunks(self, chunk: int, every: int | None = None) -> list[tuple[int, int, int, int, int | None]]:
        """(first span, end span, first token, end token, first row) per chunk of at most `chunk` spans (one host
        sync). A chunk also ends where the positions jump (the next sample, a token outside spans), so its tokens are
        consecutive logit rows from `first row` on and the span KL reads and writes them as a slice: no gather or
        scatter of whole rows (`first row` is None when a span's own tokens are not consecutive); and before every
        span whose index is a multiple of `every` (the teacher's passes, `_teacher_passes`)."""
        count = self.positions.shape[0]
        if count == 0:
            return []
        device = self.positions.device
        jump = torch.ones(count, dtype=torch.bool, device=device)  # token t does not follow token t-1's row
        jump[1:] = self.positions[1:] != self.positions[:-1] + 1
        span_first = torch.ones(count, dtype=torch.bool, device=device)  # token t starts a span
        span_first[1:] = self.spans[1:] != self.spans[:-1]
        first_tokens = torch.nonzero(span_first).squeeze(1)  # [N]: each span's first token
        index = torch.arange(first_tokens.shape[0], device=device)
        opens_run = jump[first_tokens]
        run_start = torch.cummax(torch.where(opens_run, index, 0), 0).values  # the first span of each span's run
        opens = opens_run | ((index - run_start) % chunk == 0)
        if every is not None:
            opens |= index % every == 0
        opens = torch.nonzero(opens).squeeze(1)
        token_first = first_tokens[opens]
        token_end = torch.cat([token_first[1:], token_first.new_tensor([count])])
        jumps = torch.cumsum(jump, 0)
        inside = jumps[token_end - 1] - jumps[token_first]  # jumps after a chunk's first token: within a span
        table = torch.stack([self.spans[token_first], self.spans[token_end - 1] + 1, token_first, token_end,
                             self.positions[token_first], inside]).T.tolist()
        return [(first, end, token, token_stop, row if jumped == 0 else None)
                for first, end, token, token_stop, row, jumped in table]


@dataclass(frozen=True)
class _SpanKLTerm:
    """The span KL's constants: which token rows pool into which span, both sides' shared ids, the teacher's side."""

    tokens: SpanTokens
    student_rows: torch.Tensor
    teacher_centres: torch.Tensor
    teacher_head: SharedHead
    temperature: float
    divisor: int
    chunk: int


def _labelled_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, targets) [n]: flat indices b * T + t of the logit rows with a labelled next token, and those tokens."""
    mask, targets = next_token_targets(labels)  # [B, T-1]
    batch_index, position = torch.nonzero(mask, as_tuple=True)
    return batch_index * labels.shape[1] + position, targets[batch_index, position]


class _LogitLosses(torch.autograd.Function):
    """(CE, span KL) of the student's token logits (module docstring); the KL is 0 without a span term."""

    @staticmethod
    def forward(ctx, logits, rows, targets, span: _SpanKLTerm | None):
        flat = logits.detach().reshape(-1, logits.shape[-1])
        with torch.autocast(logits.device.type, enabled=False):  # float32 throughout, whatever the caller's autocast
            lse = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
            for first in range(0, rows.shape[0], ROWS_PER_CHUNK):
                block = flat.index_select(0, rows[first:first + ROWS_PER_CHUNK])
                lse[first:first + ROWS_PER_CHUNK] = torch.logsumexp(block.float(), dim=-1)
            picked = flat[rows, targets].float()
            ce = (lse - picked).sum() / rows.shape[0]  # no labelled row: 0/0 = nan, as F.cross_entropy gives
            kl = torch.zeros((), dtype=torch.float32, device=logits.device)
            kl_part = None
            if span is not None:
                # The KL's gradient goes straight into a [B*T, V] tensor that the backward turns into the whole
                # gradient in place: the same memory the CE's gradient takes anyway, nothing kept per span.
                kl_part = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device) \
                    if ctx.needs_input_grad[0] else None
                kl = _span_kl_forward(flat, span, kl_part)
        ctx.save_for_backward(logits, rows, targets, lse)
        ctx.span, ctx.kl_part = span, kl_part
        return ce, kl

    @staticmethod
    def backward(ctx, grad_ce, grad_kl):
        logits, rows, targets, lse = ctx.saved_tensors
        flat = logits.detach().reshape(-1, logits.shape[-1])
        span, kl_part = ctx.span, ctx.kl_part
        ctx.kl_part = None  # handed over to autograd as the gradient below
        kl_scale = 0.0 if span is None or grad_kl is None else float(grad_kl)
        if kl_scale == 0.0:
            kl_part = None
        elif kl_part is None:  # a second backward through a retained graph: the first one used the tensor up
            kl_part = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
            _span_kl_forward(flat, span, kl_part)
        scale = 0.0 if grad_ce is None or not rows.numel() else float(grad_ce) / rows.shape[0]
        if scale == 0.0:  # the CE unused (or nothing labelled): its part of the gradient is 0
            grad = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device) if kl_part is None \
                else kl_part.mul_(kl_scale)
        else:
            # softmax(z) * scale = exp(z - (lse - log|scale|)), a chunk of rows at a time; an unlabelled row gets a
            # shift of +inf, so exp gives its 0 (no zero-filling, no gather of rows).
            shift = torch.full((flat.shape[0],), float("inf"), device=flat.device)
            shift[rows] = lse - torch.log(torch.tensor(abs(scale), device=flat.device))
            grad = torch.empty(flat.shape, dtype=torch.float32, device=flat.device) if kl_part is None else kl_part
            # One block of softmax reused (a fresh one per block costs its page faults each time, as `_Buffers`).
            scratch = None if kl_part is None else torch.empty(min(ROWS_PER_CHUNK, flat.shape[0]), flat.shape[1],
                                                              dtype=torch.float32, device=flat.device)
            for first in range(0, flat.shape[0], ROWS_PER_CHUNK):
                block = grad[first:first + ROWS_PER_CHUNK]
                rows_of = slice(first, first + ROWS_PER_CHUNK)
                if kl_part is None:
                    torch.sub(flat[rows_of], shift[rows_of, None], out=block).exp_()
                    if scale < 0:
                        block.neg_()
                else:  # block = softmax * scale + kl_scale * (the KL's part), in one pass over the block
                    softmax = scratch[:block.shape[0]]
                    if flat.dtype == torch.float32:
                        torch.sub(flat[rows_of], shift[rows_of, None], out=softmax).exp_()
                    else:
                        softmax.copy_(flat[rows_of]).sub_(shift[rows_of, None]).exp_()
                    torch.add(softmax.neg_() if scale < 0 else softmax, block, alpha=kl_scale, out=block)
            grad.index_put_((rows, targets), torch.full_like(lse, -scale), accumulate=True)  # - onehot * scale
        return grad.to(logits.dtype).view_as(logits), None, None, None


class _Buffers:
    """The span KL's temporaries, each allocated once per call at its largest size and reused by every chunk.

    Why: a fresh ~10 MB tensor per chunk costs more than the chunk's own work on a CPU (the allocator maps new pages
    and the first write faults them in): in a profile of the demo's SRA step, gathering 65 logit rows into a new
    tensor took 17 ms, into a reused one under 1 ms. capacity: name -> (rows, columns[, dtype]), float32 by default.
    """

    def __init__(self, device: torch.device, capacity: dict[str, tuple]) -> None:
        self.device, self.capacity, self.store = device, capacity, {}

    def __call__(self, name: str, rows: int) -> torch.Tensor:
        """The first `rows` rows of buffer `name` (contiguous, contents undefined)."""
        if name not in self.store:
            rows_max, columns, *dtype = self.capacity[name]
            self.store[name] = torch.empty(rows_max, columns, dtype=dtype[0] if dtype else torch.float32,
                                           device=self.device)
        return self.store[name][:rows]

    def once(self, name: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`make()`'s tensor, made on the first call with this name (what every pass of the call shares)."""
        if name not in self.store:
            self.store[name] = make()
        return self.store[name]


def teacher_pass_spans(weight: torch.Tensor, shared: int) -> int:
    """Spans per pass over the teacher's head [V_T, D_T] with `shared` shared ids. A product of a few spans with a big
    head is bound by reading the head (16-span passes read Qwen1.5-1.8B's 1.2 GB head 13 times for a 2x128 batch: 4
    of the 6.4 CPU seconds of a cached step); so as many spans as keep a pass's [spans, V_shared] float32 logits under
    1/16 of the head's bytes, and never fewer than a student chunk (the demo's 56 MB bf16 head, 37k shared ids: one
    chunk, 64 spans; Qwen1.5's 1.2 GB float32 head, 40k ids shared with GPT-2: 486)."""
    return max(SPAN_CHUNK, weight.numel() * weight.element_size() // 16 // (max(1, shared) * 4))


def shared_head_product(states: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
                        buffers: _Buffers | None = None) -> torch.Tensor:
    """states [n, D] @ weight[rows]^T [n, V_shared]: in `product_dtype(weight)` (the head's dtype, float32 for a bf16
    head on a CPU without a fast bf16 product), or float32 in buffer "log_p" of `buffers` (the span KL's, which also
    keeps what its passes share). When the shared ids are under half the head (Qwen1.5's 152k ids share ~40k with
    GPT-2's), only their columns are computed, the shared rows read a block at a time (neither a [n, V_T] product nor
    a copy of every shared row). Otherwise (the demo pair shares 37k of 49k) the shared rows are gathered once per
    span KL (`buffers`; a quarter of the product's work saved on every pass, and no column selection) or, for a lone
    product, the whole product is taken and then its shared columns."""
    dtype = product_dtype(weight)
    states = states.to(weight.dtype).to(dtype)  # rounded to the head's dtype, whatever the product's
    count = states.shape[0]
    out = torch.empty(count, rows.shape[0], dtype=dtype, device=states.device) if buffers is None \
        else buffers("log_p", count)
    if 2 * rows.shape[0] <= weight.shape[0]:
        block = max(1024, weight.shape[0] // 16)  # rows per block: 1/16 of the head's bytes at most, 1024 at least
        for start in range(0, rows.shape[0], block):
            out[:, start:start + block] = states @ weight.index_select(0, rows[start:start + block]).to(dtype).T
        return out
    if buffers is None:
        return torch.index_select(states @ weight.to(dtype).T, 1, rows, out=out)
    head_rows = buffers.once("head_rows", lambda: weight.index_select(0, rows))  # in the head's dtype
    if dtype != torch.float32:  # the head's own dtype (bf16 on a GPU or an AVX-512 CPU; float64), then float32
        return out.copy_(torch.mm(states, head_rows.T, out=buffers("head_product", count)))
    # Float32, a block of rows at a time: faster than one product over all the rows (on the demo's 647 x 37k, two
    # threads: 0.36-0.45 s against 0.64 s), and a bf16 head's rows converted a block at a time (no float32 copy).
    for start in range(0, rows.shape[0], PRODUCT_ROWS):
        block = head_rows[start:start + PRODUCT_ROWS]
        if block.dtype != dtype:
            block = buffers("head_block", block.shape[0]).copy_(block)
        out[:, start:start + block.shape[0]] = states @ block.T
    return out


def _teacher_passes(chunks: list[tuple], spans: int) -> list[list[tuple]]:
    """The student chunks grouped by teacher pass: spans [k * spans, (k + 1) * spans) make pass k, and no chunk
    crosses a pass (`SpanTokens.chunks(..., every=spans)`), so every pass but the last is full whatever the chunks."""
    passes: list[list[tuple]] = []
    for bounds in chunks:
        if passes and bounds[0] // spans == passes[-1][0][0] // spans:
            passes[-1].append(bounds)
        else:
            passes.append([bounds])
    return passes


def _span_kl_forward(flat: torch.Tensor, span: _SpanKLTerm, kl_part: torch.Tensor | None) -> torch.Tensor:
    """L_kl with the student's span logits pooled from the token logits `flat` [B*T, V], a chunk of spans at a time.
    With `kl_part` [B*T, V] (zeros), also adds d L_kl / d z_t = a_t g_k into it, g = (q - p) / (tau D)."""
    tokens, teacher, columns = span.tokens, span.teacher_head, span.student_rows
    teacher_rows = teacher.rows.to(flat.device)
    teacher_bias = teacher.select(teacher.bias)
    total = torch.zeros((), dtype=torch.float32, device=flat.device)
    scale = 1.0 / (span.temperature * span.divisor)
    shared = columns.shape[0]
    pass_spans = teacher_pass_spans(teacher.weight, shared)
    chunks = tokens.chunks(span.chunk, every=pass_spans)
    passes = _teacher_passes(chunks, pass_spans)
    most_tokens = max((token_end - token_first for _, _, token_first, token_end, _ in chunks), default=0)
    most_spans = max((end - first for first, end, *_ in chunks), default=0)
    widest_pass = max((group[-1][1] - group[0][0] for group in passes), default=0)
    buffers = _Buffers(flat.device, {
        "rows": (most_tokens, flat.shape[1]),  # a chunk's logit rows when they are not consecutive (rare)
        "columns": (most_tokens, shared),  # the shared columns of a chunk with longer spans, then a_t g_k
        "log_q": (most_spans, shared),  # pooled z^S / tau, then log q in place, then g in place
        "p": (most_spans, shared),
        "log_p": (widest_pass, shared),  # the teacher's z^T / tau of a pass, then log p in place
        "head_product": (widest_pass, shared, teacher.weight.dtype),  # a pass's product in a bf16 head's dtype
        "head_block": (PRODUCT_ROWS, teacher.weight.shape[1]),  # or a block of its rows in float32 (`product_dtype`)
    })
    for group in passes:
        group_first, group_end = group[0][0], group[-1][1]
        group_log_p = shared_head_product(span.teacher_centres[group_first:group_end], teacher.weight, teacher_rows,
                                          buffers)
        if teacher_bias is not None:
            group_log_p += teacher_bias.float()
        torch.log_softmax(group_log_p.div_(span.temperature), -1, out=group_log_p)
        for first, end, token_first, token_end, row in group:
            count, positions = token_end - token_first, tokens.positions[token_first:token_end]
            weights = tokens.weights[token_first:token_end, None]
            # Each token's span from 0; None when every span of the chunk is one token (then token i is span i).
            local = None if count == end - first else tokens.spans[token_first:token_end] - first
            log_q = _pooled_logits(flat, row, positions, columns, weights, local, end - first, span.temperature,
                                   buffers)
            torch.log_softmax(log_q, -1, out=log_q)
            log_p = group_log_p[first - group_first:end - group_first]  # each row read once: changed in place
            p = torch.exp(log_p, out=buffers("p", end - first))
            # sum p (log p - log q), one dot per span: a single float32 `torch.dot` over the chunk's millions of terms
            # loses ~1e-3 of the value when its rows start off a 64-byte boundary (a chunk inside a pass); these ~1e-8.
            total += torch.linalg.vecdot(p, log_p.sub_(log_q)).sum()
            if kl_part is not None:
                g = log_q.exp_().sub_(p)  # q - p [spans, V_shared], in log_q's storage
                part = g if local is None else torch.index_select(g, 0, local, out=buffers("columns", count))
                part.mul_(weights * scale)  # a_t g_k, g_k = (q_k - p_k) / (tau D)
                if row is not None:  # kl_part's consecutive rows (zeros: a token is in one span), in place
                    kl_part[row:row + count].index_add_(1, columns, part)  # index_add_ sums repeated ids
                else:  # rows built whole, then copied in: [tokens, V] rather than two [tokens, V_shared] index grids
                    kl_part.index_copy_(0, positions, buffers("rows", count).zero_().index_add_(1, columns, part))
    return total / span.divisor


def _pooled_logits(flat: torch.Tensor, row: int | None, positions: torch.Tensor, columns: torch.Tensor,
                   weights: torch.Tensor, local: torch.Tensor | None, num_spans: int, temperature: float,
                   buffers: _Buffers) -> torch.Tensor:
    """z^S / tau [num_spans, V_shared] float32 (in buffer "log_q"): the token logits `flat` [B*T, V] at `positions`
    (consecutive rows from `row` on, or None), their shared `columns`, weighted by a_t and summed per span (`local`:
    each token's span from 0; None: one token per span)."""
    count = positions.shape[0]
    picked = buffers("log_q" if local is None else "columns", count)
    if row is not None:  # consecutive rows: a view, no copy
        source = flat[row:row + count]
    elif flat.dtype == torch.float32:  # whole rows first, then the shared columns: ~2x faster than one 2D gather
        source = torch.index_select(flat, 0, positions, out=buffers("rows", count))
    else:
        source = flat.index_select(0, positions)
    if source.dtype == torch.float32:
        torch.index_select(source, 1, columns, out=picked)
    else:  # logits under autocast (bf16): converted to float32 here
        picked.copy_(source.index_select(1, columns))
    picked.mul_(weights / temperature)
    if local is None:  # one token per span: nothing to pool
        return picked
    return buffers("log_q", num_spans).zero_().index_add_(0, local, picked)


def causal_lm_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions: logits [B, T, V], labels [B, T] aligned with the inputs
    (shifted here: row t predicts labels[:, t + 1]; IGNORE_INDEX = unlabelled). Float32, equal to
    `F.cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=IGNORE_INDEX)`."""
    rows, targets = _labelled_rows(labels)
    return _LogitLosses.apply(logits, rows, targets, None)[0]


def ce_and_span_kl(
    logits: torch.Tensor,
    labels: torch.Tensor,
    tokens: SpanTokens,
    student_rows: torch.Tensor,
    teacher_centres: torch.Tensor,
    teacher_head: SharedHead,
    temperature: float,
    divisor: int,
    *,
    chunk: int = SPAN_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE, L_kl) in one node: `causal_lm_ce(logits, labels)` and the span KL of `fused_span_kl.span_kl` with the
    student's span logits pooled from `logits` [B, T, V] by `tokens` (the bias-free head's own output on the layer the
    centres pool; rows [V_shared] the student's shared ids). teacher_centres [N, D_T] and teacher_head as `span_kl`'s."""
    if tokens.num_spans != teacher_centres.shape[0]:
        raise ValueError(f"tokens describe {tokens.num_spans} spans, the teacher's centres {teacher_centres.shape[0]}")
    if student_rows.shape[0] != teacher_head.rows.shape[0]:
        raise ValueError(f"shared ids differ: student {student_rows.shape[0]}, teacher {teacher_head.rows.shape[0]}; "
                         "both must list the same shared vocabulary")
    rows, targets = _labelled_rows(labels)
    if tokens.num_spans == 0:  # the node's KL output: 0, in the graph, with no gradient of its own
        return _LogitLosses.apply(logits, rows, targets, None)
    span = _SpanKLTerm(tokens, student_rows.to(logits.device), teacher_centres.detach(), teacher_head,
                       float(temperature), int(divisor), int(chunk))
    return _LogitLosses.apply(logits, rows, targets, span)
