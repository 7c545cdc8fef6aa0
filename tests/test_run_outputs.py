"""What a tiny run leaves for the ecosystem: TensorBoard events (read back), Hub model cards in final/ and best/, a
generation config that stops at the student's EOS, and a LoRA adapter that rebuilds the merged student."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

from sra_distill.cli import main
from sra_distill.config import ConfigError, load_config
from sra_distill.evaluation.model_card import generation_config_for, hub_dataset_id, hub_model_id, refresh_model_cards
from sra_distill.run_files import read_metric_rows
from sra_distill.train import engine as engine_module
from sra_distill.train import trackers
from sra_distill.train.engine import Trainer

TINY = Path(__file__).resolve().parents[1] / "src/sra_distill/configs/tiny.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb-run")
    cfg = load_config(TINY, [f"output_dir={out}", "report_to=[tensorboard]", "run_name=tiny-tb", "eval_every=2"])
    return Trainer(cfg).train()


def test_tensorboard_gets_every_metrics_row_and_the_hparams(run):
    rows = read_metric_rows(run.metrics_path)
    events = EventAccumulator(str(run.output_dir / "tensorboard" / "tiny-tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for key in ("loss", "ce", "distill", "cos", "geo", "kl", "lr", "projector_lr", "grad_norm", "dev_rouge_l"):
        assert key in scalars, key
        logged = {e.step: e.value for e in events.Scalars(key)}
        expected = {r["step"]: r[key] for r in rows if key in r}
        assert logged.keys() == expected.keys(), key
        for step, value in expected.items():
            assert logged[step] == pytest.approx(value, rel=1e-6), (key, step)
    assert sorted(e.step for e in events.Scalars("dev_rouge_l")) == [2, 4]
    # The resolved config as hyper-parameters (accelerate writes them beside the events, and as an hparams event).
    hparams_files = list((run.output_dir / "tensorboard" / "tiny-tb").rglob("hparams.yml"))
    assert len(hparams_files) == 1
    hparams = yaml.safe_load(hparams_files[0].read_text())
    assert hparams["method"] == "sra" and hparams["student_arch.hidden_size"] == 32
    assert hparams["methods.sra.layer_pairs"] == "[[-1, -1]]" and hparams["report_to"] == '["tensorboard"]'


def test_a_missing_tracker_is_refused_before_any_model_loads(monkeypatch, tmp_path):
    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the tracker check")

    monkeypatch.setattr(engine_module, "load_model", must_not_load)
    monkeypatch.setattr(engine_module, "load_records_with_report", must_not_load)
    monkeypatch.setattr(trackers, "_installed", lambda name: name != "wandb")  # whether or not wandb is here
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "report_to=[tensorboard, wandb]"])
    with pytest.raises(ConfigError, match=r"report_to\[1\]: the wandb tracker needs the 'wandb' package.*pip install wandb"):
        Trainer(cfg)
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'"):
        trackers.tracker_names(["tensorbord"])
    assert main(["config", "--config", str(TINY), "report_to=[wandb]"]) == 2


def test_trackers_get_the_run_name_their_own_way(monkeypatch, tmp_path):
    monkeypatch.setattr(trackers, "_installed", lambda name: True)  # constructing a tracker imports nothing
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'my-run'}", "report_to=[tensorboard, wandb, mlflow]"])
    tensorboard, wandb, mlflow = trackers.build_trackers(cfg)
    assert tensorboard.run_name == "my-run" and tensorboard.logging_dir_param == str(tmp_path / "my-run" / "tensorboard")
    assert wandb.run_name == "sra-distill" and wandb.init_kwargs == {"name": "my-run"}
    assert mlflow.experiment_name == "sra-distill" and mlflow.run_name == "my-run"
    assert trackers.metric_scalars({"step": 3, "loss": 1.5, "skipped": False, "world_size": 1}) == \
        {"loss": 1.5, "skipped": 0.0, "world_size": 1.0}


def test_model_cards_carry_hub_metadata_settings_and_curves(run):
    final = ModelCard.load(run.final_dir / "README.md")
    meta = final.data.to_dict()
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"sra-distill", "knowledge-distillation", "sra"} <= set(meta["tags"])
    assert meta["teacher_model"] == "random:llama" and "base_model" not in meta  # a random student has no base
    rows = read_metric_rows(run.metrics_path)
    assert "# tiny-tb (final)" in final.text and "step 4" in final.text
    assert f"| last loss | {rows[-1]['loss']:.4g} |" in final.text
    assert "| method | `sra` |" in final.text and "geo_weight=50.0" in final.text
    best = (run.output_dir / "best" / "README.md").read_text()
    assert "# tiny-tb (best)" in best and "best dev ROUGE-L (step " in best
    # The Hub ids the metadata may name.
    assert hub_model_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_model_id("Qwen/Qwen2.5-7B") == "Qwen/Qwen2.5-7B" and hub_model_id(str(run.final_dir)) is None
    assert hub_dataset_id("dolly/train.jsonl") is None and hub_dataset_id("databricks/databricks-dolly-15k")


def test_sra_report_adds_the_evaluation_table_to_the_cards(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run.output_dir, out)
    scores = {"model": str(out / "final"), "protocol": {"seeds": [10, 20], "do_sample": True, "max_new_tokens": 8},
              "sets": {"dolly": {"n_examples": 5, "per_seed": [12.5, 13.5], "mean": 13.0, "std": 0.5}},
              "average": 13.0}
    (out / "eval").mkdir()
    (out / "eval" / "scores.json").write_text(json.dumps(scores))
    assert [p.parent.name for p in refresh_model_cards(out)] == ["final", "best"]
    card = (out / "final" / "README.md").read_text()
    assert "## Evaluation (ROUGE-L x100)" in card and "| dolly | 5 | 12.50 | 13.50 | 13.00 | 0.50 |" in card


class ForceTokenAt(LogitsProcessor):
    """Makes `token` the only choice at generation step `at` (counted from the first new token)."""

    def __init__(self, prompt_length, at, token):
        self.position, self.token = prompt_length + at, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.position:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.token] = 0.0
        return scores


def test_generation_stops_at_the_students_eos(run):
    config = json.loads((run.final_dir / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(run.final_dir)
    assert config["eos_token_id"] == tokenizer.eos_token_id and config["pad_token_id"] == tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(run.final_dir)
    prompt = tokenizer("### Instruction:\nSay hi\n\n### Response:\n", return_tensors="pt")
    n = prompt["input_ids"].shape[1]
    out = model.generate(**prompt, max_new_tokens=10, do_sample=False,
                         logits_processor=LogitsProcessorList([ForceTokenAt(n, 2, tokenizer.eos_token_id)]))
    assert out.shape[1] == n + 3 and out[0, -1] == tokenizer.eos_token_id  # stopped right at the EOS


def test_generation_config_keeps_end_of_turn_ids_of_the_same_tokenizer(run):
    tokenizer = AutoTokenizer.from_pretrained(run.final_dir)
    model = AutoModelForCausalLM.from_pretrained(run.final_dir)
    model.generation_config.eos_token_id = [7, tokenizer.eos_token_id]  # 7 is an ordinary token of GPT-2
    assert generation_config_for(model, tokenizer).eos_token_id == tokenizer.eos_token_id
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|end_of_turn|>"]})
    turn = tokenizer.convert_tokens_to_ids("<|end_of_turn|>")
    model.generation_config.eos_token_id = [turn]
    assert generation_config_for(model, tokenizer).eos_token_id == [tokenizer.eos_token_id, turn]


@pytest.mark.slow
def test_lora_student_gets_merged_weights_and_an_adapter_for_its_real_base(tmp_path):
    # A "real" base: a model folder on disk (the tiny random GPT-2 saved once), as a downloaded model would be.
    base_cfg = load_config(TINY, [f"output_dir={tmp_path / 'base-run'}", "max_steps=1", "student_arch.dropout=0"])
    base_dir = Trainer(base_cfg).train().final_dir
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'lora-run'}", f"student={base_dir}", "student_tokenizer=null",
                             "lora.enabled=true", "lora.r=4", "lora.target_modules=[c_attn]", "max_steps=2",
                             "lr=1e-2"])
    result = Trainer(cfg).train()
    adapter_config = json.loads((result.final_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(Path(base_dir).resolve())
    from peft import PeftModel

    rebuilt = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adapter_config["base_model_name_or_path"]),
                                        result.final_dir / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(result.final_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ids = torch.tensor([[464, 3290, 318, 257, 1332]])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(base(ids).logits, merged(ids).logits, atol=1e-4)  # the adapter did train
    card = ModelCard.load(result.final_dir / "README.md")
    assert "lora" in card.data.tags and "`adapter/` holds the LoRA adapter" in card.text


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_tensorboard_run_without_duplicates(tmp_path):
    overrides = [f"output_dir={tmp_path}", "report_to=[tensorboard]", "run_name=resumed", "save_every=2",
                 "keep_last=0"]
    full = Trainer(load_config(TINY, overrides)).train()
    # The job died after its step-2 checkpoint (steps 3 and 4 were logged but not saved): resume from step 2.
    shutil.rmtree(tmp_path / "checkpoints" / "step-4")
    resumed = Trainer(load_config(TINY, [*overrides, "resume=true"]))
    resumed.train()
    (tensorboard,) = resumed.accelerator.log_with
    assert tensorboard.init_kwargs == {"purge_step": 3}  # the events of steps >= 3 written before are dropped
    events = _scalars(tmp_path, "loss")
    assert [e.step for e in events] == [1, 2, 3, 4]  # each step once, in one run
    rows = {r["step"]: r["loss"] for r in read_metric_rows(full.metrics_path)}
    assert [e.value for e in events] == pytest.approx([rows[s] for s in (1, 2, 3, 4)], rel=1e-6)


def _scalars(out, tag):
    events = EventAccumulator(str(out / "tensorboard" / "resumed"))
    events.Reload()
    return sorted(events.Scalars(tag), key=lambda e: e.step)


def test_every_metrics_reader_drops_a_last_line_cut_by_a_kill(tmp_path):
    from sra_distill.evaluation.plots import plot_loss_curves
    from sra_distill.evaluation.report import training_summary
    from sra_distill.run_files import read_metric_rows

    metrics = tmp_path / "metrics.jsonl"
    whole = [{"step": 1, "loss": 2.0, "ce": 1.5}, {"step": 2, "loss": 1.8, "ce": 1.4}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in whole) + '{"step": 3, "loss": 1.')
    assert read_metric_rows(metrics) == whole
    assert plot_loss_curves(metrics, tmp_path / "curves.png").stat().st_size > 1000
    assert training_summary(read_metric_rows(metrics))
    metrics.write_text('{"step": 1, "lo\n' + json.dumps(whole[1]) + "\n")  # a bad line that is not the last
    with pytest.raises(json.JSONDecodeError):
        read_metric_rows(metrics)
