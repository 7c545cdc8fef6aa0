"""Issue #12 on the tiny config: runs never mix (lock, fresh vs resume, settings fingerprint), checkpoints are
checked (manifest, fallback), stops save (SIGINT / SIGTERM), bad settings are refused before any model loads, and
the smaller things (summary, LoRA adapters, spans report, fast help). Each test reproduces one observed failure."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from sra_distill.cli import main
from sra_distill.config import load_config
from sra_distill.data.pairing import char_budget, count_truncation, encode_side
from sra_distill.data.records import Record
from sra_distill.data.tokenization import load_tokenizer
from sra_distill.errors import RunStopped
from sra_distill.run_files import MANIFEST_NAME, list_checkpoints, verify_manifest
from sra_distill.train import engine as engine_module
from sra_distill.train.engine import Trainer
from sra_distill.train.runfolder import (
    RunFolderError,
    RunLock,
    StopSignals,
    compare_fingerprints,
    fingerprint,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "src/sra_distill/configs/tiny.yaml"
SMALL = ["max_train_examples=8", "batch_size=2", "max_length=64", "max_prompt_length=32"]


def distill(out, *overrides):
    return main(["distill", "--config", str(TINY), f"output_dir={out}", *SMALL, *overrides])


def trainer(out, *overrides):
    return Trainer(load_config(TINY, [f"output_dir={out}", *SMALL, *overrides]))


def metric_rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if the engine loads a model: these errors must come before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad setting was refused")

    monkeypatch.setattr(engine_module, "load_model", refuse)


# ------------------------------------------------------------------------------------------------ runs never mix
HOLD_LOCK = """
import sys, time
from sra_distill.train.runfolder import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_live_run_holds_output_dir_and_a_crashed_one_does_not(tmp_path, capsys, no_model_loads):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert distill(out) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid} on {socket.gethostname()}, started " in err and "in use by a running" in err
    finally:
        holder.kill()  # a crash: the lock file stays behind, its flock dies with the process
        holder.wait()
    assert (out / ".lock").exists()
    lock = RunLock(out)
    lock.acquire()
    assert f"stale lock from a run that ended without releasing it (pid {holder.pid}" in capsys.readouterr().err
    assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (out / ".lock").exists()


def test_the_lock_is_released_however_the_run_ends(tmp_path):
    run = trainer(tmp_path, "max_steps=1")
    assert (tmp_path / ".lock").exists()
    with pytest.raises(RunFolderError, match="in use by a running"):
        trainer(tmp_path, "max_steps=1")  # the same process counts too: one run per folder
    run.train()
    assert not (tmp_path / ".lock").exists()
    with pytest.raises(ValueError, match="no chat template"):  # a failing run releases it as well
        bad = tmp_path / "chat.jsonl"
        bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "yo"}]}) + "\n")
        trainer(tmp_path / "other", f"train_data={bad}").train()
    assert not (tmp_path / "other" / ".lock").exists()


def test_a_fresh_run_into_a_used_folder_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert distill(out, "max_steps=2", "save_every=1", "keep_last=5") == 0
    capsys.readouterr()
    assert distill(out, "max_steps=1") == 2
    err = capsys.readouterr().err
    assert "already holds a run (checkpoints/ (step-1, step-2), metrics.jsonl, final/)" in err
    assert "resume=true" in err and "overwrite=true" in err
    assert [r["step"] for r in metric_rows(out)] == [1, 2]  # untouched

    # The observed mix: a fresh shorter run left the older run's newer checkpoint, then resume continued it.
    assert distill(out, "max_steps=1", "save_every=1", "overwrite=true") == 0
    assert "overwrite=true: removed checkpoints, metrics.jsonl, final" in capsys.readouterr().out
    assert [step for step, _ in list_checkpoints(out)] == [1]
    assert distill(out, "max_steps=2", "save_every=1", "resume=true") == 0
    assert [r["step"] for r in metric_rows(out)] == [1, 2]


def test_resume_without_a_checkpoint_says_so_and_starts_fresh(tmp_path, capsys):
    assert distill(tmp_path, "max_steps=2", "resume=true") == 0
    out = capsys.readouterr().out
    assert f"resume=true: no complete checkpoint in {tmp_path / 'checkpoints'}; starting a fresh run" in out
    assert [r["step"] for r in metric_rows(tmp_path)] == [1, 2]
    # A run that stopped before its first checkpoint (metrics only) is started again from scratch.
    assert distill(tmp_path / "again", "max_steps=2", "log_every=1") == 0
    shutil.rmtree(tmp_path / "again" / "final")
    assert distill(tmp_path / "again", "max_steps=3", "resume=true") == 0
    assert [r["step"] for r in metric_rows(tmp_path / "again")] == [1, 2, 3]


def test_resume_with_trajectory_settings_changed_is_refused_naming_each(tmp_path, capsys, request):
    trainer(tmp_path, "max_steps=2", "save_every=2").train()
    saved_config = (tmp_path / "config.yaml").read_text()
    capsys.readouterr()
    request.getfixturevalue("no_model_loads")
    code = distill(tmp_path, "max_steps=4", "resume=true", "lr=5e-4", "batch_size=1", "method=uld")
    err = capsys.readouterr().err
    assert code == 2
    for change in ("lr: 0.001 -> 0.0005", "batch_size: 2 -> 1", "method: 'sra' -> 'uld'"):
        assert change in err, err
    assert "max_steps" not in err  # extending is allowed
    assert (tmp_path / "config.yaml").read_text() == saved_config  # refused before anything was written


def test_resume_with_safe_settings_changed_is_allowed_and_logged(tmp_path, capsys):
    trainer(tmp_path, "max_steps=2", "save_every=2").train()
    capsys.readouterr()
    result = trainer(tmp_path, "max_steps=3", "resume=true", "log_every=1", "keep_last=4",
                     "methods.uld.teacher_temperature=2.0").train()  # another method's section: not this run's
    out = capsys.readouterr().out
    assert "resume: max_steps changed 2 -> 3 (allowed)" in out and "resume: keep_last changed 2 -> 4" in out
    assert [r["step"] for r in metric_rows(result.output_dir)] == [1, 2, 3]


def test_fingerprint_covers_the_trajectory_and_only_the_active_method_section():
    base = load_config(TINY)
    changed = load_config(TINY, ["lr=2e-3", "seed=7", "methods.sra.geo_weight=3", "methods.uld.teacher_temperature=3",
                                 "max_steps=9", "save_every=3", "lora.enabled=true", "teacher_arch.num_layers=3"])
    diff = {key for key, _, _ in compare_fingerprints(fingerprint(base, 1), fingerprint(changed, 1))}
    assert diff == {"lr", "seed", "methods.sra.geo_weight", "lora.enabled", "teacher_arch.num_layers"}
    assert [k for k, _, _ in compare_fingerprints(fingerprint(base, 1), fingerprint(base, 2))] == ["processes"]


# ------------------------------------------------------------------------------------------ checkpoints checked
def test_every_checkpoint_has_a_manifest_of_sizes_and_checksums(tmp_path):
    trainer(tmp_path, "max_steps=1", "save_every=1").train()
    checkpoint = tmp_path / "checkpoints" / "step-1"
    files = json.loads((checkpoint / MANIFEST_NAME).read_text())["files"]
    on_disk = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {MANIFEST_NAME}
    assert {"model.safetensors", "trainer_state.json", "fingerprint.json", "config.yaml"} <= set(files)
    for name, entry in files.items():
        data = (checkpoint / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify_manifest(checkpoint) is None


@pytest.mark.parametrize("damage", ["truncated model.safetensors", "broken trainer_state.json"])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_resumes(tmp_path, capsys, damage):
    trainer(tmp_path, "max_steps=3", "save_every=1", "keep_last=5").train()
    newest = tmp_path / "checkpoints" / "step-3"
    if damage.startswith("truncated"):
        bad = newest / "model.safetensors"
        bad.write_bytes(bad.read_bytes()[:100])
    else:
        bad = newest / "trainer_state.json"
        bad.write_text('{"step": 3,\n "epoch": "\x01')
    capsys.readouterr()
    result = trainer(tmp_path, "max_steps=4", "save_every=1", "keep_last=5", "resume=true").train()
    captured = capsys.readouterr()
    assert f"checkpoint {newest} is corrupt or incomplete and is skipped: {bad}" in captured.err
    assert f"resumed from {tmp_path / 'checkpoints' / 'step-2'} (step 2)" in captured.out
    assert [r["step"] for r in metric_rows(result.output_dir)] == [1, 2, 3, 4]
    assert verify_manifest(newest) is None  # step 3 was trained again and saved whole


def test_a_checkpoint_that_verifies_but_does_not_load_falls_back(tmp_path, capsys):
    trainer(tmp_path, "max_steps=2", "save_every=1", "keep_last=5").train()
    run = trainer(tmp_path, "max_steps=3", "save_every=1", "keep_last=5", "resume=true")
    original = run.accelerator.load_state

    def fails_on_step_2(path, **kwargs):
        if path.endswith("step-2"):
            raise OSError("disk read error")
        return original(path, **kwargs)

    run.accelerator.load_state = fails_on_step_2
    run.train()
    err = capsys.readouterr().err
    assert "step-2 is corrupt or incomplete and is skipped: it does not load (OSError: disk read error)" in err
    assert [r["step"] for r in metric_rows(tmp_path)] == [1, 2, 3]


# ------------------------------------------------------------------------------------------------- stops save
def test_second_sigint_aborts_at_once():
    # What was installed before (a background job's shell may have set SIGINT to "ignore") comes back after.
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stops = StopSignals()
    stops.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # preemption may repeat SIGTERM: keep finishing the step
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stops.restore()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def rows_match(got, expected_rows):
    expected = {r["step"]: r for r in expected_rows}
    for row in got:
        for key in ("loss", "ce", "cos", "geo", "kl", "lr"):
            assert row[key] == pytest.approx(expected[row["step"]][key], rel=1e-5, abs=1e-6), (row["step"], key)


def same_final(a, b):
    wa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6)


def test_a_signal_finishes_the_step_saves_and_the_resumed_run_matches(tmp_path, capsys):
    full = trainer(tmp_path / "full", "max_steps=4").train()
    out = tmp_path / "stopped"
    run = trainer(out, "max_steps=4")
    original = run.train_step

    def signal_during_step_2(group, *args, **kwargs):
        if run.state.step == 1:  # the signal arrives while step 2 runs
            os.kill(os.getpid(), signal.SIGTERM)
        return original(group, *args, **kwargs)

    run.train_step = signal_during_step_2
    with pytest.raises(RunStopped) as stopped:
        run.train()
    assert stopped.value.exit_code == 143 and stopped.value.step == 2
    checkpoint = out / "checkpoints" / "step-2"
    assert stopped.value.checkpoint == checkpoint and verify_manifest(checkpoint) is None
    printed = capsys.readouterr().out
    assert f"checkpoint saved in {checkpoint}" in printed
    assert f"Continue with: sra distill --config {out / 'config.yaml'} resume=true" in printed
    assert [r["step"] for r in metric_rows(out)] == [1, 2] and not (out / ".lock").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    cfg = load_config(out / "config.yaml", ["resume=true"])  # the printed command, in process
    resumed = Trainer(cfg).train()
    got = metric_rows(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    rows_match(got, metric_rows(full.output_dir))
    same_final(full.final_dir, resumed.final_dir)


@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sra_distill_stopped_by_a_signal_exits_130_or_143_with_a_checkpoint(tmp_path, signum, code):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sra_distill", "distill", "--config", str(TINY), *SMALL, "max_steps=200",
         f"output_dir={out}"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip():
                proc.send_signal(signum)
                break
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr[-3000:]
    steps = [step for step, _ in list_checkpoints(out)]
    assert len(steps) == 1 and 1 <= steps[0] < 200
    assert f"checkpoint saved in {out / 'checkpoints' / f'step-{steps[0]}'}" in stdout
    assert "resume=true" in stdout and "Traceback" not in stderr
    assert not (out / ".lock").exists()


# ------------------------------------------------------------------------- bad settings, before any model loads
BAD_SETTINGS = {
    "batch_size=0": "batch_size: must be >= 1, got 0",
    "grad_accum=0": "grad_accum: must be >= 1, got 0",
    "log_every=0": "log_every: must be >= 1, got 0",
    "teacher_precision=fp64": "teacher_precision: expected one of fp32, bf16, fp16, got 'fp64'",
    "precision=fp32": "precision: expected one of no, bf16, fp16, got 'fp32'",
    "projector_lr=-1": "projector_lr: must be > 0, got -1.0",
    "lr=0": "lr: must be > 0, got 0.0",
    "alpha=2": "alpha: must be in [0, 1], got 2.0",
    "weight_decay=-0.1": "weight_decay: must be >= 0, got -0.1",
    "max_steps=0": "max_steps: must be >= 1, got 0",
    "method=foo": "method: expected one of sft, sra, uld",
    "student=random:bert": "student: expected one of random:gpt2, random:llama, got 'random:bert'",
    # Issue 29: refused by name before any model loads (before: inf trained, nan failed in torch after the loads, a
    # bad width was a ZeroDivisionError or RuntimeError, a mistyped key listed every known key).
    "lr=inf": "lr: must be a finite number, got inf",
    "lr=nan": "lr: must be a finite number, got nan",
    "student_arch.hidden_size=0": "student_arch.hidden_size: must be >= 1, got 0",
    "student_arch.hidden_size=-32": "student_arch.hidden_size: must be >= 1, got -32",
    "student_arch.num_heads=5": "student_arch.num_heads: must divide hidden_size=32, got 5",
    "teacher_arch.num_heads=16": "teacher_arch.num_heads: random:llama needs an even head size",
    "on_polcy.ratio=0.5": "unknown setting 'on_polcy.ratio'; did you mean 'on_policy.ratio'?",
}


@pytest.mark.parametrize("setting", sorted(BAD_SETTINGS))
def test_bad_settings_are_refused_with_the_key_before_models_load(tmp_path, capsys, no_model_loads, setting):
    assert distill(tmp_path / "run", setting) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sra distill: error: ") and BAD_SETTINGS[setting] in lines[0]
    assert not (tmp_path / "run").exists()


def test_warmup_longer_than_the_run_warns(tmp_path, capsys):
    trainer(tmp_path, "max_steps=1", "warmup_steps=5").close()
    assert "warmup_steps=5 exceeds the run's 1 steps" in capsys.readouterr().err


def test_output_dir_that_is_a_file_or_not_writable_is_refused(tmp_path, capsys, no_model_loads):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    assert distill(a_file) == 2
    assert f"output_dir: {a_file} exists and is not a folder" in capsys.readouterr().err
    assert distill("/proc/sra-run") == 2  # refuses new files even for root
    assert "output_dir: /proc/sra-run is not writable (its parent /proc refuses a new file" in capsys.readouterr().err


def test_hub_ids_fail_at_once_naming_allow_download(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert distill(tmp_path / "a", "teacher=someorg/no-such-model") == 2
    err = capsys.readouterr().err
    assert "teacher: 'someorg/no-such-model' is not a local folder or file" in err and "allow_download=true" in err
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE is True  # set inside the process without allow_download
    assert distill(tmp_path / "b", "teacher=no-such-model") == 2  # a bare id reaches the loader, offline
    err = capsys.readouterr().err
    assert "'no-such-model' is not a local folder or file" in err and "allow_download=true" in err


def test_a_mistyped_relative_train_data_path_is_file_not_found(tmp_path, capsys, no_model_loads):
    assert distill(tmp_path, "train_data=dolly/trian.jsonl") == 2
    err = capsys.readouterr().err
    assert "train_data: file not found: dolly/trian.jsonl" in err and "dolly/trian.jsonl" in err


def test_invalid_utf8_names_the_file_and_line(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"prompt": "a", "output": "b"}\n{"prompt": "caf\xe9", "output": "b"}\n')
    assert distill(tmp_path / "run", f"train_data={data}") == 2
    assert f"{data} line 2: not valid UTF-8 (byte 0xe9 at byte 16 of the line)" in capsys.readouterr().err


class CountingTokenizer:
    """Records the longest text a tokenizer is asked to encode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, max(map(len, [text] if isinstance(text, str) else text)))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("family", ["gpt2", "llama2"])
def test_a_huge_record_is_cut_by_characters_before_tokenising(family):
    tokenizer = load_tokenizer(family)
    record = Record("word " * 100_000 + "\n\n### Response:\n", "answer " * 60_000, ["x"], None, "t", 1)
    counting = CountingTokenizer(tokenizer)
    side = encode_side(record, counting, max_length=64, max_prompt_length=16)
    cut = side.truncation
    assert counting.longest <= char_budget(tokenizer, 64) < len(record.response)
    # The kept tokens are those of the whole text under the stated policy (plain reference computation).
    full_prompt = tokenizer(record.prompt)["input_ids"]
    full_response = tokenizer(record.response, add_special_tokens=False)["input_ids"]
    bos = full_prompt[:1] if full_prompt[0] == tokenizer.bos_token_id else []
    expected_prompt = bos + full_prompt[len(full_prompt) - (16 - len(bos)):]
    assert side.input_ids == expected_prompt + full_response[:48]
    assert cut.prompt_tokens_dropped > 0 and cut.response_tokens_dropped > 0 and cut.eos_dropped


# ------------------------------------------------------------------------------------------------- evaluation
@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    folder = tmp_path_factory.mktemp("short-context")
    model.save_pretrained(folder)
    load_tokenizer("gpt2").save_pretrained(folder)
    return folder


def eval_file(tmp_path, n=4):
    path = tmp_path / "qa.jsonl"
    rows = [{"prompt": f"### Instruction:\n{'Tell me a long story about the sea. ' * 8} {i}\n\n### Response:\n",
             "output": "A story."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_evaluate_fits_the_context_window_and_records_it(tmp_path, short_context_model, capsys):
    data = eval_file(tmp_path)
    code = main(["evaluate", "--model", str(short_context_model), "--data", str(data), "--seeds", "1",
                 "--max-new-tokens", "100", "--max-prompt-tokens", "256", "--greedy", "--no-progress",
                 "--output", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("the model has 64 positions") == 1 and "cut to 32 + 32" in err
    protocol = json.loads((tmp_path / "eval" / "scores.json").read_text())["protocol"]
    assert protocol["context_window"] == 64
    assert protocol["fitted_to_context"] == {"max_prompt_tokens": 32, "max_new_tokens": 32}


def test_ctrl_c_during_evaluate_keeps_the_predictions_so_far(tmp_path, short_context_model, capsys, monkeypatch):
    data = eval_file(tmp_path, n=6)
    original = GPT2LMHeadModel.generate
    calls = []

    def interrupted_on_the_third_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GPT2LMHeadModel, "generate", interrupted_on_the_third_batch)
    code = main(["evaluate", "--model", str(short_context_model), "--data", str(data), "--seeds", "1",
                 "--max-new-tokens", "4", "--batch-size", "2", "--greedy", "--no-progress",
                 "--output", str(tmp_path / "eval")])
    assert code == 130
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["seed"] == 1 and "prediction" in r for r in rows)
    assert "interrupted; the 4 predictions finished so far are kept" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- smaller things
def test_summary_names_no_checkpoints_folder_when_none_is_written(tmp_path, capsys):
    assert distill(tmp_path, "max_steps=1", "save_every=0") == 0
    out = capsys.readouterr().out
    assert "final student :" in out and "checkpoints   :" not in out
    assert not (tmp_path / "checkpoints").exists()


def test_lora_adapter_on_a_random_student_is_refused(tmp_path, capsys, no_model_loads):
    assert distill(tmp_path, "lora.enabled=true", "lora.merge_on_save=false") == 2
    assert "lora.merge_on_save=false with student=random:gpt2" in capsys.readouterr().err


def test_responses_without_shared_spans_are_counted_in_the_data_report(tmp_path):
    gpt2, llama = load_tokenizer("gpt2"), load_tokenizer("llama2")
    prompt = "a b c d e f g h i j k"
    records = [Record(prompt, r, [r], None, "t", i) for i, r in
               enumerate(["supercalifragilistic", "Übermäßig", "\u200b\u200b", "Hello world"])]
    # max_length 10 leaves 2 response tokens per side: "Übermäßig" and the zero-width pair then end at different
    # characters on the two sides (offsets above: gpt2 [0,1],[0,1] vs llama [0,4],[4,5]), so no cut is shared.
    counts = count_truncation(records, gpt2, llama, max_length=10, max_prompt_length=8)
    assert counts.no_shared_spans == 2
    assert "2 responses share no span boundary" in counts.summary()
    trainer(tmp_path, "max_steps=1").train()
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["truncation"]["no_shared_spans"] == 0


def test_help_and_argument_errors_do_not_import_torch():
    probe = ("import sys\nfrom sra_distill.cli import main\n"
             "for argv in (['--help'], ['vocab', '--bogus'], ['config', '--bogus']):\n"
             "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
             "print('torch' in sys.modules, 'transformers' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False False"
