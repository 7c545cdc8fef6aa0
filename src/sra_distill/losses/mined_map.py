"""MinED's vocabulary map: every teacher token id -> the student token id whose string is closest in edit distance.

FuseLLM ("Knowledge Fusion of Large Language Models", arXiv 2401.10491, `vocab_mapping.py`) and the DSKD code
that uses it as the MinED baseline map each teacher token string, with the teacher's word-start marker replaced by
the student's (`Ġ` <-> `▁`), to the student token with the minimum Levenshtein distance; an exact string match
wins outright. Special tokens with a role on both sides (eos, bos, unk, pad) map role to role.

Speed: exact matches are a dictionary look-up; only the rest are searched, with rapidfuzz's `cdist` (C++, all
cores), first against candidates of nearly the same length (a distance <= r rules out any candidate whose length
differs by more than r), widening the window only for queries not settled. Ties go to the lowest student id. The map is deterministic and cached on disk under `cache_dir()/mined_map/`,
keyed by a hash of both vocabularies, markers and special tokens; `build_mined_map` is what a CLI command calls
ahead of training.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from sra_distill.data.tokenization import tokenizer_spec
from sra_distill.paths import cache_dir

_FORMAT = 1  # bump when the mapping rules change, so stale caches are not reused
_ROLES = ("eos_token", "bos_token", "unk_token", "pad_token")
_memory_cache: dict[str, torch.Tensor] = {}


def _tokens_by_id(tokenizer: PreTrainedTokenizerBase) -> list[str | None]:
    vocab = tokenizer.get_vocab()
    tokens: list[str | None] = [None] * (max(vocab.values()) + 1)
    for token, index in vocab.items():
        tokens[index] = token
    return tokens


def _roles(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    return {role: getattr(tokenizer, role) for role in _ROLES if getattr(tokenizer, role) is not None}


def mined_map_key(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase) -> str:
    """Content hash of everything the map depends on."""
    digest = hashlib.sha256()
    for tok in (student_tok, teacher_tok):
        payload = {
            "vocab": sorted(tok.get_vocab().items(), key=lambda kv: kv[1]),
            "marker": tokenizer_spec(tok).word_start_marker,
            "roles": _roles(tok),
        }
        digest.update(json.dumps(payload, ensure_ascii=False).encode())
    digest.update(str(_FORMAT).encode())
    return digest.hexdigest()[:24]


def compute_mined_map(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase) -> torch.Tensor:
    """The map without caching: long [teacher vocabulary size], a student id per teacher id (-1 for id holes)."""
    s_marker = tokenizer_spec(student_tok).word_start_marker
    t_marker = tokenizer_spec(teacher_tok).word_start_marker
    s_vocab = student_tok.get_vocab()
    s_tokens = _tokens_by_id(student_tok)
    t_tokens = _tokens_by_id(teacher_tok)
    s_roles = _roles(student_tok)
    role_of_teacher_token = {token: role for role, token in _roles(teacher_tok).items() if role in s_roles}

    mapping = torch.full((len(t_tokens),), -1, dtype=torch.long)
    pending: list[tuple[int, str]] = []
    for t_id, token in enumerate(t_tokens):
        if token is None:
            continue
        if token in role_of_teacher_token:
            mapping[t_id] = s_vocab[s_roles[role_of_teacher_token[token]]]
            continue
        query = token.replace(t_marker, s_marker)
        exact = s_vocab.get(query)
        if exact is not None:
            mapping[t_id] = exact
        else:
            pending.append((t_id, query))

    for t_id, s_id in zip([t for t, _ in pending], nearest_by_edit_distance([q for _, q in pending], s_tokens)):
        mapping[t_id] = s_id
    return mapping


# Search radii: a query whose best distance is <= r only needs candidates whose length is within r of its own
# (Levenshtein >= length difference), so most queries are settled against a small slice of the vocabulary.
_RADII = (1, 2, 4)


def nearest_by_edit_distance(queries: list[str], candidates: list[str | None]) -> list[int]:
    """For each query, the index of the candidate at minimum Levenshtein distance (ties: lowest index)."""
    from rapidfuzz import process  # local: only MinED needs rapidfuzz
    from rapidfuzz.distance import Levenshtein

    lengths = np.array([len(c) if c is not None else -(10**6) for c in candidates])  # holes never match
    result = [-1] * len(queries)
    todo = list(range(len(queries)))
    for radius in _RADII:
        by_length: dict[int, list[int]] = {}
        for qi in todo:
            by_length.setdefault(len(queries[qi]), []).append(qi)
        todo = []
        for length, group in by_length.items():
            window = np.flatnonzero(np.abs(lengths - length) <= radius)  # ascending ids: argmin breaks ties low
            if len(window) == 0:
                todo.extend(group)
                continue
            dist = process.cdist(
                [queries[qi] for qi in group],
                [candidates[i] for i in window],
                scorer=Levenshtein.distance,
                score_cutoff=radius,
                dtype=np.int32,
                workers=-1,
            )
            best = dist.argmin(1)
            for row, qi in enumerate(group):
                if dist[row, best[row]] <= radius:
                    result[qi] = int(window[best[row]])
                else:
                    todo.append(qi)
    if todo:  # far from everything: a full scan
        valid = np.flatnonzero(lengths >= 0)
        dist = process.cdist(
            [queries[qi] for qi in todo], [candidates[i] for i in valid], scorer=Levenshtein.distance,
            dtype=np.int32, workers=-1,
        )
        for row, qi in enumerate(todo):
            result[qi] = int(valid[dist[row].argmin()])
    return result


def build_mined_map(student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase) -> torch.Tensor:
    """The teacher-id -> student-id map, from the in-process cache, the disk cache, or computed and stored."""
    key = mined_map_key(student_tok, teacher_tok)
    if key in _memory_cache:
        return _memory_cache[key]
    folder = cache_dir() / "mined_map"
    path = folder / f"{key}.pt"
    if path.exists():
        mapping = torch.load(path, weights_only=True)
    else:
        mapping = compute_mined_map(student_tok, teacher_tok)
        folder.mkdir(parents=True, exist_ok=True)
        # Write then rename, so concurrent workers never read a half-written file.
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        torch.save(mapping, tmp)
        os.replace(tmp, path)
    _memory_cache[key] = mapping
    return mapping
