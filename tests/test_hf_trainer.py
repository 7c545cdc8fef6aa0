"""`DistillTrainer` with the real `transformers.Trainer` on the tiny pair (the tiny config's models): the same
batches and loss as the engine, one optimiser step that equals the engine's, and a projector that survives
`save_model` and `resume_from_checkpoint` exactly."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GenerationConfig, TrainerCallback, TrainingArguments

from sra_distill.config import load_config
from sra_distill.models.capture import last_block_parameters
from sra_distill.paths import resolve_data_path
from sra_distill.train.engine import Trainer
from sra_distill.train.hf_trainer import (
    METHOD_WEIGHTS_NAME,
    DistillCollator,
    DistillTrainer,
    SRATrainer,
    batch_to_features,
    features_to_batch,
)
from sra_distill.train.weighting import gradmag_alpha

TINY = Path(__file__).resolve().parents[1] / "src/sra_distill/configs/tiny.yaml"
# Dropout off and a constant schedule, so one engine step and one Trainer step are the same computation.
SAME_STEP = ["student_arch.dropout=0", "warmup_steps=0", "min_lr_ratio=1.0", "weight_decay=0.01", "max_grad_norm=1.0"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    cfg = load_config(TINY, [f"output_dir={tmp_path_factory.mktemp('engine')}", *SAME_STEP])
    return Trainer(cfg)


def raw_records(n=8):
    """The first training records as raw JSON objects, as a user's dataset would hold them."""
    lines = resolve_data_path("dolly/train.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def hf_trainer(engine, tmp_path, teacher="engine", teacher_cache=None, max_length=None, **overrides):
    """A DistillTrainer on copies of the engine's models, with the engine's projector weights."""
    cfg = engine.cfg
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.lr,
                   lr_scheduler_type="constant", weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                   max_steps=1, report_to=[], save_strategy="no", logging_steps=1, seed=cfg.seed,
                   optim="adamw_torch", dataloader_drop_last=False, use_cpu=True)
    options.update(overrides)
    trainer = SRATrainer(
        model=copy.deepcopy(engine.accelerator.unwrap_model(engine.student)),
        teacher=copy.deepcopy(engine.teacher) if teacher == "engine" else teacher, teacher_cache=teacher_cache,
        args=TrainingArguments(**options),
        processing_class=engine.student_tokenizer, teacher_tokenizer=engine.teacher_tokenizer,
        method_config=cfg.methods.sra, alpha=cfg.alpha, projector_lr=cfg.methods.sra.projector_lr,
        max_length=max_length or cfg.max_length, max_prompt_length=cfg.max_prompt_length,
        train_dataset=raw_records(cfg.batch_size),
    )
    trainer.distill_method.load_state_dict(engine.accelerator.unwrap_model(engine.method).state_dict())
    return trainer


def test_collator_builds_the_engines_batch_and_round_trips(engine):
    records = raw_records(4)
    collator = DistillCollator(engine.student_tokenizer, engine.teacher_tokenizer, engine.cfg.max_length,
                               engine.cfg.max_prompt_length)
    features = collator(records)
    expected = engine.collator([engine.dataset[i] for i in range(4)])  # the engine's first four records
    got = features_to_batch(features)
    for side in ("student", "teacher"):
        for name in ("input_ids", "attention_mask", "labels", "span_ids", "response_start"):
            assert torch.equal(getattr(getattr(got, side), name), getattr(getattr(expected, side), name)), (side, name)
    assert torch.equal(got.num_spans, expected.num_spans)
    assert set(batch_to_features(got)) == set(features)
    with pytest.raises(KeyError, match="missing student_span_ids"):
        features_to_batch({k: v for k, v in features.items() if k != "student_span_ids"})


def test_loss_equals_the_engines_on_the_same_batch(engine, tmp_path):
    trainer = hf_trainer(engine, tmp_path)
    batch = engine.collator([engine.dataset[i] for i in range(engine.cfg.batch_size)])
    features = trainer.data_collator(raw_records(engine.cfg.batch_size))
    # The projector is in the Trainer's optimizer, at its own learning rate.
    optimizer = trainer.create_optimizer()
    projector_group = optimizer.param_groups[-1]
    assert projector_group["lr"] == engine.cfg.methods.sra.projector_lr
    assert {id(p) for p in projector_group["params"]} == {id(p) for p in trainer.distill_method.parameters()}
    trainer.optimizer = None  # let train() build it afresh

    trainer.model.train()
    hf_parts = trainer.distill_losses(trainer.model, features_to_batch(features))
    engine_parts = engine._forward(batch)
    for name in ("ce", "distill", "cos", "geo", "kl"):
        torch.testing.assert_close(hf_parts[name], engine_parts[name], rtol=1e-6, atol=1e-7, msg=name)
    expected = engine.cfg.alpha * engine_parts["ce"] + (1 - engine.cfg.alpha) * engine_parts["distill"]
    torch.testing.assert_close(trainer.compute_loss(trainer.model, features), expected, rtol=1e-6, atol=1e-7)


def test_gradmag_balance_uses_the_engines_alpha(engine, tmp_path):
    trainer = hf_trainer(engine, tmp_path)
    trainer.balance = "gradmag"
    batch = engine.collator([engine.dataset[i] for i in range(engine.cfg.batch_size)])
    parts = trainer.distill_losses(trainer.model.train(), batch)
    engine_parts = engine._forward(batch)
    expected = gradmag_alpha(engine_parts["ce"], engine_parts["distill"], last_block_parameters(engine.student))
    assert 0.0 < float(parts["alpha"]) < 1.0
    assert float(parts["alpha"]) == pytest.approx(expected, rel=1e-5)
    alpha = float(parts["alpha"])
    torch.testing.assert_close(parts["loss"], alpha * parts["ce"] + (1 - alpha) * parts["distill"])


@pytest.mark.slow
def test_one_trainer_step_equals_one_engine_step(engine, tmp_path):
    trainer = hf_trainer(engine, tmp_path)
    batch = engine.collator([engine.dataset[i] for i in range(engine.cfg.batch_size)])
    features = trainer.data_collator(raw_records(engine.cfg.batch_size))
    hf_parts = trainer.distill_losses(trainer.model.train(), features_to_batch(features))
    trainer.train()  # one real Trainer step on the same four records (one batch)
    metrics = engine.train_step([batch])
    hf_loss = trainer.state.log_history[0]["loss"]
    assert hf_loss == pytest.approx(metrics["loss"], rel=1e-5)
    assert hf_loss == pytest.approx(float(hf_parts["loss"].detach()), rel=1e-5)
    engine_student = engine.accelerator.unwrap_model(engine.student).state_dict()
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, engine_student[name], rtol=1e-4, atol=1e-6, msg=name)
    engine_projector = engine.accelerator.unwrap_model(engine.method).state_dict()
    for name, value in trainer.distill_method.state_dict().items():
        torch.testing.assert_close(value, engine_projector[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_save_model_and_resume_restore_the_projector_exactly(engine, tmp_path):
    steps = dict(max_steps=4, per_device_train_batch_size=2, save_strategy="steps", save_steps=2)
    full = hf_trainer(engine, tmp_path / "full", **steps)
    full.train_dataset = raw_records(8)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    saved = load_file(str(checkpoint / METHOD_WEIGHTS_NAME))
    assert set(saved) == {"projectors.0.weight", "projectors.0.bias"}
    assert not torch.equal(saved["projectors.0.weight"], full.distill_method.projectors[0].weight.detach())

    # A restarted job: a fresh trainer with a different projector, only checkpoint-2 on disk, resume_from_checkpoint.
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-2")
    resumed = hf_trainer(engine, tmp_path / "resumed", **steps)
    resumed.train_dataset = raw_records(8)
    with torch.no_grad():
        for param in resumed.distill_method.parameters():
            param.add_(1.0)
    resumed.load_method_state(str(checkpoint))
    for name, value in resumed.distill_method.state_dict().items():
        assert torch.equal(value, saved[name]), name
    with torch.no_grad():
        for param in resumed.distill_method.parameters():
            param.add_(1.0)
    at_start = {}

    class RecordStart(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # after every checkpoint load, before step 3
            at_start["projector"] = {k: v.clone() for k, v in resumed.distill_method.state_dict().items()}
            at_start["moments"] = [resumed.optimizer.state[p]["exp_avg_sq"].clone()
                                   for p in resumed.distill_method.parameters()]

    resumed.add_callback(RecordStart())
    resumed.train(resume_from_checkpoint=True)  # restores the projector and its optimizer state, then 2 more steps
    for name, value in at_start["projector"].items():
        assert torch.equal(value, saved[name]), name
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    projector_ids = optimizer_state["param_groups"][-1]["params"]
    for restored, param_id in zip(at_start["moments"], projector_ids):
        assert torch.equal(restored, optimizer_state["state"][param_id]["exp_avg_sq"])
    # The continued run matches the uninterrupted one: the same losses at steps 3 and 4, weights to float noise
    # (the step-3 gradient norm differs in its 7th digit, which Adam amplifies for near-zero gradient entries): an
    # absolute 1e-5 is 1% of one Adam step at this lr (1e-3); a restore that failed would be off by whole steps.
    losses = [r["loss"] for r in resumed.state.log_history if "loss" in r]
    assert losses == pytest.approx([r["loss"] for r in full.state.log_history if "loss" in r], rel=1e-6)
    for name, value in resumed.distill_method.state_dict().items():
        torch.testing.assert_close(value, full.distill_method.state_dict()[name], rtol=1e-3, atol=1e-4, msg=name)
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, full.model.state_dict()[name], rtol=1e-5, atol=1e-5, msg=name)


def test_save_model_writes_the_projector_and_a_generation_config(engine, tmp_path):
    trainer = hf_trainer(engine, tmp_path)
    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(str(tmp_path / "final" / METHOD_WEIGHTS_NAME))
    for name, value in trainer.distill_method.state_dict().items():
        assert torch.equal(saved[name], value), name
    assert GenerationConfig.from_pretrained(tmp_path / "final").eos_token_id == engine.student_tokenizer.eos_token_id
    AutoModelForCausalLM.from_pretrained(tmp_path / "final")  # a plain model folder
    with pytest.raises(FileNotFoundError, match="not written by a DistillTrainer"):
        trainer.load_method_state(str(tmp_path))


def test_a_teacher_cache_replaces_the_teacher_with_the_same_loss(engine, tmp_path):
    from sra_distill.errors import ConfigError
    from sra_distill.train.teacher_cache import TeacherCacheError, build_teacher_cache

    cfg = engine.cfg
    cache = tmp_path / "cache"
    build_teacher_cache(cfg, cache, dtype="fp32")
    live = hf_trainer(engine, tmp_path / "live")
    cached = hf_trainer(engine, tmp_path / "cached", teacher=None, teacher_cache=cache)
    assert cached.teacher is cached.teacher_cache.head  # the teacher model never loaded: only its head
    features = live.data_collator(raw_records(cfg.batch_size))
    live.model.train()
    cached.model.train()
    live_parts = live.distill_losses(live.model, features_to_batch(features))
    cached_parts = cached.distill_losses(cached.model, features_to_batch(features))
    for name in ("ce", "distill", "cos", "geo", "kl"):
        torch.testing.assert_close(cached_parts[name], live_parts[name], rtol=1e-6, atol=1e-6, msg=name)
    # A record outside the data the cache was built from is refused when its batch comes, saying why.
    unknown = [dict(raw_records(1)[0], output="A reply that no cached record has.")]
    with pytest.raises(TeacherCacheError, match="not in the cache"):
        cached.distill_losses(cached.model, features_to_batch(cached.data_collator(unknown)))
    with pytest.raises(TeacherCacheError, match="max_length: cache 128, this run 96"):
        hf_trainer(engine, tmp_path / "other", teacher=None, teacher_cache=cache, max_length=96)
    with pytest.raises(ConfigError, match="one of the two"):
        hf_trainer(engine, tmp_path / "both", teacher_cache=cache)


def test_another_method_runs_through_the_same_trainer(engine, tmp_path):
    cfg = engine.cfg
    trainer = DistillTrainer(
        model=copy.deepcopy(engine.accelerator.unwrap_model(engine.student)), teacher=engine.teacher,
        args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
        processing_class=engine.student_tokenizer, teacher_tokenizer=engine.teacher_tokenizer, method="uld",
        max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
    )
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(raw_records(2)))
    assert torch.isfinite(loss) and loss.requires_grad


# Run under torchrun: the same tiny models on every rank, SRATrainer for 2 steps, each rank's state saved.
TWO_PROCESS_PROBE = '''import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainingArguments

from sra_distill.config import load_config
from sra_distill.train.hf_trainer import SRATrainer
from sra_distill.data.records import load_records
from sra_distill.models.load import load_model

cfg = load_config(sys.argv[1], ["student_arch.dropout=0"])
out = Path(sys.argv[2])
teacher, teacher_tok = load_model(cfg.teacher, tokenizer=cfg.teacher_tokenizer, arch=cfg.teacher_arch,
                                  dtype=torch.float32, seed=cfg.seed + 1)
student, student_tok = load_model(cfg.student, tokenizer=cfg.student_tokenizer, arch=cfg.student_arch,
                                  dtype=torch.float32, seed=cfg.seed)
trainer = SRATrainer(
    model=student, teacher=teacher, processing_class=student_tok, teacher_tokenizer=teacher_tok,
    max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, train_dataset=load_records(cfg.train_data, limit=8),
    args=TrainingArguments(output_dir=str(out), max_steps=2, per_device_train_batch_size=2, use_cpu=True,
                           report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True),
)
initial = {k: v.clone() for k, v in trainer.distill_method.state_dict().items()}
trainer.train()
rank = trainer.args.process_index
state = {f"projector.{k}": v.contiguous() for k, v in trainer.distill_method.state_dict().items()}
state.update({f"initial.{k}": v for k, v in initial.items()})
state.update({f"student.{k}": v.contiguous() for k, v in trainer.model.state_dict().items() if k != "lm_head.weight"})
save_file(state, str(out / f"rank{rank}.safetensors"))
print("world", trainer.args.world_size, "rank", rank)
'''


@pytest.mark.slow
def test_two_processes_keep_one_projector(tmp_path):
    """The projector sits outside the Trainer's DDP wrapper; its gradients are averaged by hand, so every rank keeps
    the same projector (without the averaging the ranks drift apart: 1.5e-3 after 2 steps, measured once)."""
    script = tmp_path / "probe.py"
    script.write_text(TWO_PROCESS_PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(TINY), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [load_file(str(tmp_path / "out" / f"rank{r}.safetensors")) for r in (0, 1)]
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name
    moved = ranks[0]["projector.projectors.0.weight"] - ranks[0]["initial.projectors.0.weight"]
    assert moved.abs().max() > 1e-4  # the projector trained
