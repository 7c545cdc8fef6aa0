"""`sra student` / `student.build_student`: a pretrained body re-tokenised for another vocabulary."""

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from sra_distill.cli import main
from sra_distill.data.tokenization import load_tokenizer
from sra_distill.models.student import build_student, parse_layers, student_folder, transfer_rows


def save_source(folder, arch, tokenizer_name, tie=True, layers=3):
    """A small random source model with a real tokenizer, saved as a Hugging Face folder."""
    tok = load_tokenizer(tokenizer_name)
    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=layers, n_head=2, n_positions=128, **common))
    else:
        cls, config_cls = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[arch]
        model = cls(config_cls(hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                               num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=tie, **common))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


@pytest.fixture(scope="module")
def llama_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama_src")
    model, tok = save_source(folder, "llama", "smollm2", tie=False)
    return folder, model, tok


def test_copied_byte_and_role_rows_come_from_the_source(llama_source):
    folder, source, source_tok = llama_source
    student, tok, report = build_student(str(folder), "llama2")
    emb, src = student.get_input_embeddings().weight, source.get_input_embeddings().weight
    # SentencePiece's word-start marker is a space: Llama-2's "▁the" takes SmolLM2's "Ġthe" row.
    assert torch.equal(emb[tok.convert_tokens_to_ids("▁the")], src[source_tok.convert_tokens_to_ids("Ġthe")])
    assert torch.equal(emb[tok.convert_tokens_to_ids("ing")], src[source_tok.convert_tokens_to_ids("ing")])
    # A byte-fallback token is the byte it stands for: <0x41> is "A".
    assert torch.equal(emb[tok.convert_tokens_to_ids("<0x41>")], src[source_tok.convert_tokens_to_ids("A")])
    # Special tokens by role.
    assert torch.equal(emb[tok.eos_token_id], src[source_tok.eos_token_id])
    assert torch.equal(emb[tok.bos_token_id], src[source_tok.bos_token_id])
    assert torch.equal(emb[tok.unk_token_id], src[source_tok.unk_token_id])
    assert report.copied > 10_000 and report.composed > 1_000 and report.by_role == 3
    assert report.copied + report.composed + report.by_role + report.unmappable == len(tok)
    assert student.config.vocab_size == len(tok) and student.config.eos_token_id == tok.eos_token_id


def test_composed_row_is_the_mean_of_the_source_tokenization(llama_source):
    folder, source, source_tok = llama_source
    student, tok, _ = build_student(str(folder), "llama2")
    emb, src = student.get_input_embeddings().weight, source.get_input_embeddings().weight
    vocab = source_tok.get_vocab()
    checked = 0
    # Plain words of Llama-2 that SmolLM2 has no single token for.
    words = sorted(t for t in tok.get_vocab() if t.startswith("▁") and t[1:].isalpha() and t[1:].isascii()
                   and len(t) > 6 and t.replace("▁", "Ġ") not in vocab)
    for token in words[:25]:
        token_id = tok.convert_tokens_to_ids(token)
        pieces = source_tok.encode(token.replace("▁", " "), add_special_tokens=False)
        assert len(pieces) > 1
        torch.testing.assert_close(emb[token_id], src[pieces].mean(0))
        checked += 1
    assert checked == 25


def test_untied_head_is_transferred_like_the_embeddings(llama_source):
    folder, source, source_tok = llama_source
    student, tok, _ = build_student(str(folder), "llama2")
    head, src_head = student.get_output_embeddings().weight, source.get_output_embeddings().weight
    assert head.data_ptr() != student.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(head, transfer_rows(src_head, source_tok, tok))
    assert torch.equal(head[tok.convert_tokens_to_ids("▁the")], src_head[source_tok.convert_tokens_to_ids("Ġthe")])


@pytest.mark.parametrize("arch,source_tokenizer,target_tokenizer", [
    ("gpt2", "gpt2", "llama2"), ("qwen2", "qwen1.5", "gpt2"), ("llama", "llama2", "mistral"),
])
def test_saved_student_reloads_and_generates_to_the_new_eos(tmp_path, arch, source_tokenizer, target_tokenizer):
    save_source(tmp_path / "src", arch, source_tokenizer)
    out = tmp_path / "student"
    assert main(["student", "--from", str(tmp_path / "src"), "--tokenizer", target_tokenizer,
                 "--layers", "0,2", "--output", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    target = load_tokenizer(target_tokenizer)
    assert len(tok) == len(target) == model.get_input_embeddings().num_embeddings
    text = "Name three rivers. Then say why"
    assert tok(text).input_ids == target(text).input_ids  # the saved tokenizer is the new one, leading spaces too
    assert model.generation_config.eos_token_id == target.eos_token_id
    assert model.config.num_hidden_layers == 2
    assert json.loads((out / "transfer.json").read_text())["layers"] == [0, 2]
    # Make EOS the most likely next token: generation must stop right there (the new EOS, not the source's).
    def favour_eos(module, inputs, output):
        output = output.clone()
        output[..., target.eos_token_id] += 1e4
        return output

    model.get_output_embeddings().register_forward_hook(favour_eos)
    enc = tok(text, return_tensors="pt")
    generated = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == enc.input_ids.shape[1] + 1 and generated[0, -1].item() == target.eos_token_id


def test_pruned_student_keeps_the_chosen_blocks_and_generates_with_a_cache(tmp_path):
    source, _ = save_source(tmp_path, "llama", "llama2", layers=5)
    student, tok, report = build_student(str(tmp_path), "gpt2", layers=3)
    assert report.layers == [0, 2, 4]
    for new, old in zip(student.model.layers, (0, 2, 4)):
        torch.testing.assert_close(new.mlp.up_proj.weight, source.model.layers[old].mlp.up_proj.weight)
        assert new.self_attn.layer_idx == list(student.model.layers).index(new)
    enc = tok("Hello there", return_tensors="pt")
    with_cache = student.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=True)
    without = student.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)


def test_layer_choices():
    assert parse_layers(None, 30) is None
    assert parse_layers(30, 30) is None
    assert parse_layers(4, 10) == [0, 3, 6, 9]
    assert parse_layers("0-2,8,9", 10) == [0, 1, 2, 8, 9]
    with pytest.raises(ValueError, match="0..9"):
        parse_layers([0, 10], 10)
    with pytest.raises(ValueError, match="1..10"):
        parse_layers(11, 10)
    with pytest.raises(ValueError, match="count"):
        parse_layers("first-two", 10)


def test_bad_inputs_get_clear_errors(tmp_path, capsys, monkeypatch, llama_source):
    folder = llama_source[0]
    assert main(["student", "--from", str(folder), "--tokenizer", "no-such-tok", "--output", str(tmp_path / "a")]) == 2
    assert "no-such-tok" in capsys.readouterr().err
    assert main(["student", "--from", str(folder), "--tokenizer", "gpt2", "--layers", "0,7",
                 "--output", str(tmp_path / "b")]) == 2
    assert "0..2" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert main(["student", "--from", str(folder), "--tokenizer", "gpt2", "--output", str(tmp_path / "full")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    # A model class without an input embedding matrix.
    monkeypatch.setattr(LlamaForCausalLM, "get_input_embeddings", lambda self: None)
    with pytest.raises(ValueError, match="no input embedding"):
        build_student(str(folder), "gpt2")


def test_config_from_form_builds_and_trains_the_student(tmp_path, monkeypatch):
    from pathlib import Path

    from sra_distill.config import load_config
    from sra_distill.train.engine import Trainer

    monkeypatch.setenv("SRA_CACHE", str(tmp_path / "cache"))
    save_source(tmp_path / "src", "llama", "smollm2", layers=2)
    tiny = Path(__file__).resolve().parents[1] / "src/sra_distill/configs/tiny.yaml"
    cfg = load_config(tiny, [f"output_dir={tmp_path / 'run'}", f"student=from:{tmp_path / 'src'}",
                             "student_tokenizer=gpt2", "max_steps=2"])
    trainer = Trainer(cfg)
    assert trainer.student.get_input_embeddings().num_embeddings == len(load_tokenizer("gpt2"))
    result = trainer.train()
    assert result.steps == 2
    assert len(list((tmp_path / "cache" / "students").iterdir())) == 1  # built once, cached
    with pytest.raises(ValueError, match="student_tokenizer"):
        from sra_distill.models.load import load_model
        load_model(f"from:{tmp_path / 'src'}", tokenizer=None, arch=cfg.student_arch, dtype=torch.float32, seed=0)


@pytest.mark.slow
def test_real_student_has_far_lower_ce_than_a_random_one():
    """SmolLM2-135M-Instruct's body with the Llama-2 vocabulary already models Dolly responses."""
    from sra_distill.data.records import load_records

    folder = student_folder("smollm2-135m-instruct", "llama2", quiet=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = load_tokenizer("llama2")
    random_model = AutoModelForCausalLM.from_config(model.config).eval()
    records = load_records("dolly/valid.jsonl", limit=6)

    def ce(m):
        losses = []
        for r in records:
            prompt = tok(r.prompt).input_ids[-96:]
            response = tok(r.response, add_special_tokens=False).input_ids[:64]
            full = prompt + response
            labels = torch.tensor([full])
            labels[0, : len(prompt)] = -100
            with torch.no_grad():
                losses.append(m(input_ids=torch.tensor([full]), labels=labels).loss.item())
        return sum(losses) / len(losses)

    built, rand = ce(model), ce(random_model)
    assert rand > 9.0 and built < 0.5 * rand, (built, rand)  # measured: 4.57 against 10.35


def test_from_settings_are_checked_before_any_model_loads(tmp_path):
    from sra_distill.config import ConfigError, load_config
    from sra_distill.validation import validate_settings

    def check(*overrides):
        validate_settings(load_config(None, [f"output_dir={tmp_path / 'run'}", *overrides]))

    check()  # the defaults: from:smollm2-135m-instruct with llama2
    with pytest.raises(ConfigError, match="student_tokenizer"):
        check("student_tokenizer=null")
    with pytest.raises(ConfigError, match="student_layers"):
        check("student=random:gpt2", "student_layers=4")
    with pytest.raises(ConfigError, match="file not found"):
        check(f"student=from:{tmp_path / 'nope.gguf'}")


def test_model_card_and_lora_base_of_a_from_student(tmp_path, monkeypatch):
    from sra_distill.evaluation.model_card import hub_model_id, real_base_location

    monkeypatch.setenv("SRA_CACHE", str(tmp_path / "cache"))
    assert hub_model_id("from:smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    save_source(tmp_path / "src", "llama", "smollm2", layers=2)
    base = real_base_location(f"from:{tmp_path / 'src'}", "gpt2")
    assert base == str(student_folder(str(tmp_path / "src"), "gpt2", quiet=True).resolve())
    assert AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().num_embeddings == len(load_tokenizer("gpt2"))
