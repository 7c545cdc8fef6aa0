"""Evaluation protocol: ROUGE-L metric, left-padded seeded generation, score files, the `sra evaluate` glue."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sra_distill.cli import main  # noqa: E402
from sra_distill.data.records import load_records  # noqa: E402
from sra_distill.data.tokenization import load_tokenizer  # noqa: E402
from sra_distill.evaluation.evaluate import (  # noqa: E402
    SUITES,
    dev_rouge,
    evaluate_model,
    parse_eval_sets,
    parse_seeds,
    rouge_l,
)
from sra_distill.evaluation.generate import encode_prompts, generate, left_pad  # noqa: E402
from sra_distill.models.load import load_model  # noqa: E402
from sra_distill.paths import data_root  # noqa: E402

PROMPTS = [
    "Hello there, how are you",
    "### Response:\n",
    "A much longer prompt about the weather in the mountains of northern Spain on a cold winter day is",
    "x",
    "Below is an instruction.\n\n### Instruction:\nName a colour.\n\n### Response:\n",
]


def _lcs_f1(prediction: str, reference: str) -> float:
    """Plain ROUGE-L F1 on lower-cased whitespace tokens (valid for the stem-free, punctuation-free pairs below)."""
    a, b = prediction.lower().split(), reference.lower().split()
    if not a or not b:
        return 0.0
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    lcs = table[-1][-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model(tiny_gpt2):
    # A larger init range spreads the logits, so greedy argmax is not decided by float noise between batch shapes.
    return tiny_gpt2(initializer_range=0.2)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_model, gpt2_tok):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_model.save_pretrained(folder)
    gpt2_tok.save_pretrained(folder)
    return folder


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------ metric


def test_rouge_l_hand_checked_pairs():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("alpha beta gamma", "delta epsilon") == 0.0
    # LCS("the cat sat on the mat", "the cat on mat") = 4: P = 4/6, R = 4/4, F = 2PR/(P+R) = 0.8
    assert rouge_l("the cat sat on the mat", "the cat on mat") == pytest.approx(0.8)
    # LCS = "the brown" = 2 of 4 each side: F = 0.5
    assert rouge_l("the quick brown fox", "the brown dog jumps") == pytest.approx(0.5)


@pytest.mark.parametrize(
    "prediction, reference",
    [
        ("one two three four five", "two four six"),
        ("a b a b a", "b a b"),
        ("x y z", "z y x w"),
        ("the answer is forty two", "forty two is the answer"),
    ],
)
def test_rouge_l_matches_plain_lcs(prediction, reference):
    assert rouge_l(prediction, reference) == pytest.approx(_lcs_f1(prediction, reference))


def test_rouge_l_stemming_case_and_punctuation():
    assert rouge_l("Running dogs!", "run dog") == 1.0
    assert rouge_l("The cats are running", "the cat is running") == pytest.approx(0.75)  # 3 of 4 each side


def test_rouge_l_max_over_references_and_empty():
    refs = ["completely unrelated words", "the cat on mat", "the cat sat on the mat"]
    assert rouge_l("the cat sat on the mat", refs) == 1.0
    assert rouge_l("the cat sat on the mat", refs[:2]) == pytest.approx(0.8)
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("   ", ["a b", "c"]) == 0.0
    with pytest.raises(ValueError, match="references is empty"):
        rouge_l("x", [])
    with pytest.raises(TypeError, match="must be strings"):
        rouge_l("x", [None])


# ------------------------------------------------------------------ generation


def test_prompt_truncation_keeps_bos_and_the_last_tokens(gpt2_tok):
    long_prompt = " ".join(f"word{i}" for i in range(200)) + "\n\n### Response:\n"
    full = gpt2_tok(long_prompt)["input_ids"]
    (kept,) = encode_prompts(gpt2_tok, [long_prompt], 16)
    assert kept == full[-16:]
    assert gpt2_tok.decode(kept).endswith("### Response:\n")
    llama = load_tokenizer("llama2")
    full = llama(long_prompt)["input_ids"]
    assert full[0] == llama.bos_token_id
    (kept,) = encode_prompts(llama, [long_prompt], 16)
    assert kept == [llama.bos_token_id] + full[-15:]
    (short,) = encode_prompts(llama, ["hi"], 16)
    assert short == llama("hi")["input_ids"]


def test_left_pad_right_aligns_every_prompt():
    input_ids, attention_mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []], pad_id=0)


def test_batched_greedy_equals_unbatched(tiny_model, gpt2_tok):
    batched = generate(tiny_model, gpt2_tok, PROMPTS, seed=0, batch_size=3, max_new_tokens=10, do_sample=False)
    single = [generate(tiny_model, gpt2_tok, [p], seed=0, batch_size=1, max_new_tokens=10, do_sample=False)[0]
              for p in PROMPTS]
    assert batched == single
    assert all(batched)  # a random model does not stop at once: the comparison is not between empty strings


def test_response_is_the_decoded_continuation(tiny_model, gpt2_tok):
    """The reply equals decoding what plain `model.generate` appends to the unpadded prompt."""
    prompt = PROMPTS[2]
    ids = gpt2_tok(prompt, return_tensors="pt")["input_ids"]
    out = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                              no_repeat_ngram_size=6, pad_token_id=gpt2_tok.eos_token_id)
    expected = gpt2_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert generate(tiny_model, gpt2_tok, [prompt], seed=0, max_new_tokens=10, do_sample=False) == [expected]


def test_sampling_is_reproducible_per_seed(tiny_model, gpt2_tok):
    first = generate(tiny_model, gpt2_tok, PROMPTS, seed=10, batch_size=2, max_new_tokens=8)
    torch.manual_seed(12345)  # the global state before the call must not matter
    again = generate(tiny_model, gpt2_tok, PROMPTS, seed=10, batch_size=2, max_new_tokens=8)
    other = generate(tiny_model, gpt2_tok, PROMPTS, seed=20, batch_size=2, max_new_tokens=8)
    assert first == again
    assert first != other
    assert len(first) == len(PROMPTS)


def test_model_generation_config_does_not_change_the_protocol(tiny_model, gpt2_tok):
    """Sampling settings a model ships (top_k, temperature, repetition penalty) are overridden by the protocol."""
    reference = generate(tiny_model, gpt2_tok, PROMPTS[:2], seed=10, max_new_tokens=8)
    saved = tiny_model.generation_config
    try:
        tiny_model.generation_config = saved.__class__(top_k=1, temperature=0.01, repetition_penalty=3.0, top_p=0.1)
        assert generate(tiny_model, gpt2_tok, PROMPTS[:2], seed=10, max_new_tokens=8) == reference
    finally:
        tiny_model.generation_config = saved


def test_tokenizer_is_not_mutated_and_pad_defaults_to_eos(tiny_model, gpt2_tok, tmp_path):
    before = (gpt2_tok.padding_side, gpt2_tok.truncation_side, gpt2_tok.pad_token)
    generate(tiny_model, gpt2_tok, PROMPTS[:2], seed=1, max_new_tokens=4)
    assert (gpt2_tok.padding_side, gpt2_tok.truncation_side, gpt2_tok.pad_token) == before
    raw = AutoTokenizer.from_pretrained(data_root() / "tokenizers" / "gpt2")  # no pad token
    assert raw.pad_token is None
    out = generate(tiny_model, raw, PROMPTS[:3], seed=1, max_new_tokens=4, do_sample=False)
    assert out == generate(tiny_model, gpt2_tok, PROMPTS[:3], seed=1, max_new_tokens=4, do_sample=False)
    assert raw.pad_token is None and raw.padding_side == "right"


def test_generate_rejects_bad_settings(tiny_model, gpt2_tok):
    with pytest.raises(ValueError, match="batch_size"):
        generate(tiny_model, gpt2_tok, PROMPTS, seed=1, batch_size=0)
    with pytest.raises(ValueError, match="prompt 1 encodes to no tokens"):
        generate(tiny_model, gpt2_tok, ["a", ""], seed=1)


# ------------------------------------------------------------------ evaluate_model and dev_rouge


@pytest.fixture
def eval_files(tmp_path):
    template = "Below is an instruction.\n\n### Instruction:\n{}\n\n### Response:\n"
    (tmp_path / "qa").mkdir()
    a = _write_jsonl(tmp_path / "qa" / "valid.jsonl", [
        {"prompt": template.format("Name a colour."), "output": "red"},
        {"prompt": template.format("Say hello."), "output": "hello there friend"},
        {"prompt": template.format("Count to three."), "output": "one two three"},
        {"prompt": template.format("Unused because of max_examples."), "output": "x"},
    ])
    b = _write_jsonl(tmp_path / "multi.jsonl", [
        {"prompt": template.format("Title this."), "output": ["a title", "another title here"]},
        {"prompt": template.format("Summarise it."), "output": ["short summary", "the"]},
    ])
    return {"qa": a, "multi": b}


def test_evaluate_model_files_agree(tiny_model, gpt2_tok, eval_files, tmp_path):
    out = tmp_path / "out"
    report = evaluate_model(tiny_model, gpt2_tok, eval_files, seeds=[1, 2], max_examples=3, output_dir=out,
                            batch_size=2, progress=False, max_new_tokens=6)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == (3 + 2) * 2
    on_disk = json.loads((out / "scores.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    for name, n in (("qa", 3), ("multi", 2)):
        s = on_disk["sets"][name]
        assert s["n_examples"] == n and s["seeds"] == [1, 2]
        recomputed = []
        for seed in (1, 2):
            mine = sorted((r for r in rows if r["set"] == name and r["seed"] == seed), key=lambda r: r["index"])
            assert len(mine) == n
            recomputed.append(100 * np.mean([rouge_l(r["prediction"], r["references"]) for r in mine]))
        assert s["per_seed"] == pytest.approx(recomputed)
        assert s["mean"] == pytest.approx(np.mean(recomputed))
        assert s["std"] == pytest.approx(np.sqrt(np.mean((np.array(recomputed) - np.mean(recomputed)) ** 2)))
    assert on_disk["average"] == pytest.approx((on_disk["sets"]["qa"]["mean"] + on_disk["sets"]["multi"]["mean"]) / 2)
    first_multi = next(r for r in rows if r["set"] == "multi" and r["seed"] == 1)
    assert first_multi["references"] == ["a title", "another title here"]
    # Predictions match a direct generate call with the same seed.
    prompts = [r.prompt for r in load_records(eval_files["qa"], limit=3)]
    assert [r["prediction"] for r in rows if r["set"] == "qa" and r["seed"] == 2] == generate(
        tiny_model, gpt2_tok, prompts, seed=2, batch_size=2, max_new_tokens=6)
    md = (out / "scores.md").read_text()
    assert "| qa | 3 |" in md and "| multi | 2 |" in md and f"{on_disk['average']:.2f}" in md


def test_empty_responses_score_zero_and_count(gpt2_tok, eval_files, tmp_path):
    """A model that emits EOS first gives empty responses: each scores 0 and the set mean is 0, not undefined."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=32, n_layer=1, n_head=2, n_positions=300)).eval()
    with torch.no_grad():
        direction = torch.randn(32)
        model.transformer.ln_f.weight.zero_()  # final hidden state = this constant direction everywhere
        model.transformer.ln_f.bias.copy_(direction)
        model.transformer.wte.weight[gpt2_tok.eos_token_id] = 100 * direction  # tied head: EOS always wins
    report = evaluate_model(model, gpt2_tok, {"qa": eval_files["qa"]}, seeds=[1], max_examples=3,
                            output_dir=tmp_path / "o", progress=False, max_new_tokens=5)
    rows = [json.loads(line) for line in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == ["", "", ""]
    assert report["sets"]["qa"]["n_examples"] == 3 and report["sets"]["qa"]["per_seed"] == [0.0]


def test_dev_rouge_from_records_and_from_prompts(tiny_model, gpt2_tok, eval_files):
    records = load_records(eval_files["multi"])
    from_records = dev_rouge(tiny_model, gpt2_tok, records, seed=3, max_new_tokens=6)
    prompts = [r.prompt for r in records]
    refs = [r.references for r in records]
    assert dev_rouge(tiny_model, gpt2_tok, prompts, refs, seed=3, max_new_tokens=6) == pytest.approx(from_records)
    preds = generate(tiny_model, gpt2_tok, prompts, seed=3, max_new_tokens=6)
    assert from_records == pytest.approx(100 * np.mean([rouge_l(p, r) for p, r in zip(preds, refs)]))
    with pytest.raises(ValueError, match="2 prompts but 1 references"):
        dev_rouge(tiny_model, gpt2_tok, prompts, refs[:1])


def test_evaluate_model_rejects_chat_records(tiny_model, gpt2_tok, tmp_path):
    chat = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                {"role": "assistant", "content": "hello"}]}])
    with pytest.raises(ValueError, match="chat record"):
        evaluate_model(tiny_model, gpt2_tok, {"chat": chat}, seeds=[1], progress=False)


# ------------------------------------------------------------------ loading and CLI


def test_load_model_for_evaluation(saved_model, tiny_model, tmp_path):
    model, tok = load_model(saved_model, dtype="fp32", device="cpu")
    assert tok.pad_token == tok.eos_token and not model.training
    ids = torch.tensor([[464, 3290, 318]])
    torch.testing.assert_close(model(ids).logits, tiny_model(ids).logits)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "nothing")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(saved_model, dtype="float99")
    bare = tmp_path / "bare"
    tiny_model.save_pretrained(bare)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_model(bare, device="cpu")
    assert load_model(bare, device="cpu", tokenizer="gpt2")[1].name_or_path == "gpt2"


def test_eval_set_names_and_argument_errors(tmp_path):
    sets = parse_eval_sets(["dolly/valid.jsonl", "sinst/11_/valid.jsonl"], None)
    assert list(sets) == ["dolly", "sinst"]
    assert sets["dolly"] == data_root() / "dolly" / "valid.jsonl"
    assert list(parse_eval_sets(None, None)) == list(SUITES["paper"])
    assert list(parse_eval_sets(["mine=dolly/dev.jsonl"], ["paper"]))[-1] == "mine"
    with pytest.raises(ValueError, match="two evaluation sets are named 'dolly'"):
        parse_eval_sets(["dolly/dev.jsonl"], ["paper"])
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        parse_eval_sets([str(tmp_path / "nope.jsonl")], None)
    with pytest.raises(ValueError, match="unknown suite"):
        parse_eval_sets(None, ["other"])
    assert parse_seeds("10, 20,30") == [10, 20, 30]
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_seeds("10,x")


def _cli(argv):
    """`sra evaluate ARGV` as a user runs it: through the CLI, which prints a user error as one line (exit 2)."""
    return main(["evaluate", *argv])


@pytest.mark.slow
def test_cli_end_to_end(saved_model, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--model", str(saved_model), "--suite", "paper", "--max-examples", "3", "--seeds", "10,20",
            "--max-new-tokens", "6", "--batch-size", "3", "--no-progress", "--output", str(out)]
    assert _cli(argv) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert list(scores["sets"]) == ["dolly", "self-inst", "vicuna", "sinst", "dialogsum"]
    assert all(s["n_examples"] == 3 and len(s["per_seed"]) == 2 for s in scores["sets"].values())
    rows = (out / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 5 * 3 * 2
    assert json.loads(rows[0])["prompt"].endswith("### Response:\n")
    assert "| **average** |" in capsys.readouterr().out
    greedy = tmp_path / "greedy"
    assert _cli(["--model", str(saved_model), "--data", "vicuna/valid.jsonl", "--max-examples", "2", "--seeds", "1",
                 "--max-new-tokens", "4", "--greedy", "--no-progress", "--output", str(greedy)]) == 0
    assert json.loads((greedy / "scores.json").read_text())["protocol"]["do_sample"] is False


def test_cli_reports_bad_input(saved_model, tmp_path, capsys):
    missing = str(tmp_path / "missing.jsonl")
    assert _cli(["--model", str(saved_model), "--data", missing, "--output", str(tmp_path)]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert _cli(["--model", str(tmp_path / "no-model"), "--data", "vicuna/valid.jsonl", "--output", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert _cli(["--model", str(saved_model), "--seeds", "a", "--output", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_cli_threads(saved_model, tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the module runs with 1 thread; the option must change it
        assert _cli(["--model", str(saved_model), "--data", "vicuna/valid.jsonl", "--max-examples", "1", "--seeds",
                     "1", "--max-new-tokens", "2", "--threads", "1", "--no-progress", "--output", str(tmp_path)]) == 0
        assert torch.get_num_threads() == 1
        assert _cli(["--model", str(saved_model), "--threads", "0", "--output", str(tmp_path)]) == 2
        assert "--threads must be >= 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
