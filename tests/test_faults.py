"""Bad input and faults on the tiny config: malformed records, skipped and truncated records, hard Unicode, slow
tokenizers, chat data without a chat template, non-finite losses, kills and crashes mid-save, unsafe files."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sra_distill.cli import main
from sra_distill.config import ArchSettings, Config, load_config
from sra_distill.data.pairing import pair_example
from sra_distill.data.spans import span_ids
from sra_distill.data.tokenization import load_tokenizer
from sra_distill.models.load import load_model
from sra_distill.run_files import list_checkpoints
from sra_distill.train.engine import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "src/sra_distill/configs/tiny.yaml"
PROMPT = "Below is an instruction.\n\n### Instruction:\n{}\n\n### Response:\n"


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def good(i):
    return {"prompt": PROMPT.format(f"Say number {i}."), "output": f"The number is {i}."}


# Smaller than tiny.yaml's defaults: the fault tests need steps, not learning.
SMALL = ["max_train_examples=8", "batch_size=2", "max_length=64", "max_prompt_length=32"]


def trainer(tmp_path, *overrides):
    return Trainer(load_config(TINY, [f"output_dir={tmp_path}", *overrides]))


def metric_rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ------------------------------------------------------------------------------------------ data validation (CLI)
BAD_RECORDS = {
    "not JSON": ('{"prompt": "a", "output": "b"', "not valid JSON"),
    "missing output": ({"prompt": "a"}, "matches no known format"),
    "prompt not a string": ({"prompt": 3, "output": "b"}, "field 'prompt' must be a string, got int"),
    "output list of numbers": ({"prompt": "a", "output": [1, 2]}, "field 'output' must be a string or a list"),
    "output empty list": ({"prompt": "a", "output": []}, "field 'output' is an empty list"),
    "chat without assistant": ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]},
                               "field 'messages' must end with the assistant response"),
    "chat content not a string": ({"messages": [{"role": "user", "content": None},
                                                {"role": "assistant", "content": "x"}]},
                                  "field 'messages[0].content' must be a string"),
    "record is a list": (["prompt", "output"], "record must be a JSON object, got list"),
}


@pytest.mark.parametrize("name", sorted(BAD_RECORDS))
def test_bad_record_stops_sra_distill_with_exit_2_naming_file_line_and_field(tmp_path, capsys, name):
    bad, message = BAD_RECORDS[name]
    data = write_jsonl(tmp_path / "train.jsonl", [good(1), good(2), bad, good(3)])
    code = main(["distill", "--config", str(TINY), f"train_data={data}", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{data} line 3" in err and message in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before training


def test_no_usable_records_is_a_data_error(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "output": "  "}])
    assert main(["distill", "--config", str(TINY), f"train_data={data}", f"output_dir={tmp_path}"]) == 2
    assert "no usable training records" in capsys.readouterr().err


# --------------------------------------------------------------------------------- skipped and truncated records
def reference_truncation(records, tokenizer, max_length, max_prompt_length):
    """The stated policy, computed directly: the prompt keeps max_prompt_length tokens, the response fills the rest
    of max_length minus one for EOS; EOS is dropped whenever the response does not leave room for it."""
    prompt_cut = response_cut = eos_dropped = 0
    for prompt, response in records:
        n_prompt = len(tokenizer(prompt)["input_ids"])
        n_response = len(tokenizer(response, add_special_tokens=False)["input_ids"])
        budget = max_length - min(n_prompt, max_prompt_length)
        prompt_cut += n_prompt > max_prompt_length
        response_cut += n_response > budget
        eos_dropped += n_response >= budget
    return prompt_cut, response_cut, eos_dropped


@pytest.mark.slow
def test_empty_responses_are_skipped_counted_and_truncation_reported(tmp_path, capsys):
    long_prompt = PROMPT.format("Explain this. " + "word " * 60)
    long_response = "A long answer. " * 40
    rows = [
        good(1),
        {"prompt": PROMPT.format("Nothing?"), "output": ""},
        {"prompt": long_prompt, "output": "Short."},
        {"instruction": "Blank answer", "output": "   \n"},
        {"prompt": PROMPT.format("Talk a lot."), "output": long_response},
        {"prompt": long_prompt, "output": long_response},
    ]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    run = trainer(tmp_path / "run", f"train_data={data}", "max_train_examples=null", "batch_size=2", "max_steps=2",
                  "max_length=96", "max_prompt_length=48")
    run.train()
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert (report["read"], report["loaded"]) == (6, 4)
    assert [line for _, line in report["skipped_empty_response"]] == [2, 4]
    kept = [(r["prompt"], r["output"]) for r in rows if r["output"].strip()]
    truncation = report["truncation"]
    assert truncation["examples"] == 4 and (truncation["max_length"], truncation["max_prompt_length"]) == (96, 48)
    for side, name in (("student", "gpt2"), ("teacher", "llama2")):
        expected = reference_truncation(kept, load_tokenizer(name), 96, 48)
        got = (truncation["prompt_truncated"][side], truncation["response_truncated"][side],
               truncation["eos_dropped"][side])
        assert got == expected, side
        assert expected[0] == 2 and expected[1] == 2  # the data really exercises both cuts
    out = capsys.readouterr().out
    assert "skipped 2 with empty response (line 2, line 4)" in out
    assert "prompt keeps its last 48 tokens" in out and "over the 4 records this run uses" in out


def test_summary_covers_only_the_records_a_short_run_uses(tmp_path):
    run = trainer(tmp_path, "max_train_examples=40", "batch_size=2", "max_steps=3")
    report, summary = run.data_report_and_summary()
    assert report["loaded"] == 40 and report["truncation"]["examples"] == 6
    assert "over the 6 records this run uses" in summary


UNICODE = [
    ("Translate to Chinese: good morning", "早上好！今天天气很好。日本語も少し。"),
    ("Reply with emoji", "Great job 👍🏽 🎉 family: 👨‍👩‍👧‍👦 flag: 🏳️‍🌈"),
    ("Greet in Arabic", "مرحبا بالعالم، كيف حالك؟"),
    ("Spell with combining marks", "cafe\u0301 nai\u0308ve Z\u0351\u0328a\u0300lgo e\u0301\u0301"),
    ("Mix them", "Ελληνικά, русский, हिन्दी, 한국어 and ﬁ ligatures\u200b zero-width."),
]


@pytest.mark.slow
def test_cjk_emoji_zwj_arabic_and_combining_marks_train_normally(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl",
                       [{"prompt": PROMPT.format(p + " 🌍"), "output": r} for p, r in UNICODE])
    student, teacher = load_tokenizer("gpt2"), load_tokenizer("llama2")
    for _, response in UNICODE:
        from sra_distill.data.records import Record

        example = pair_example(Record(PROMPT.format("x"), response, [response], None, "t", 1), student, teacher)
        s, t = example.student, example.teacher
        _, _, n = span_ids(s.offsets, t.offsets, s.response_start, t.response_start,
                           student_special=s.special, teacher_special=t.special)
        assert n >= 3, response
    result = trainer(tmp_path / "run", f"train_data={data}", "max_train_examples=null", "batch_size=3",
                     "max_steps=2").train()
    rows = metric_rows(result.metrics_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(not r["skipped"] and all(map(torch.isfinite, torch.tensor([r["loss"], r["kl"], r["cos"]])))
               for r in rows)


# ------------------------------------------------------------------------------ tokenizers the pipeline cannot use
def test_slow_tokenizer_gets_an_error_naming_the_fix(tmp_path, capsys):
    from transformers import ByT5Tokenizer  # Python-only in transformers 5: no offset mappings

    folder = tmp_path / "byt5"
    ByT5Tokenizer().save_pretrained(folder)
    with pytest.raises(ValueError, match=r"slow \(Python\) tokenizer.*fast tokenizer.*tokenizer\.json"):
        load_tokenizer(folder)
    code = main(["distill", "--config", str(TINY), f"student_tokenizer={folder}", f"output_dir={tmp_path / 'run'}"])
    assert code == 2 and "provide a tokenizer.json" in capsys.readouterr().err


def test_chat_data_with_a_tokenizer_without_chat_template_fails_before_training(tmp_path, capsys):
    chat = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}
    data = write_jsonl(tmp_path / "chat.jsonl", [chat] * 4)
    run = trainer(tmp_path / "run", f"train_data={data}")  # gpt2 and llama2 ship no chat template
    with pytest.raises(ValueError, match=r"has no chat template.*chat.jsonl line [1-4];.*use a tokenizer with a chat template"):
        run.train()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    code = main(["distill", "--config", str(TINY), f"train_data={data}", f"output_dir={tmp_path / 'cli'}"])
    assert code == 2 and "has no chat template" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- non-finite losses
def poison(run, bad_steps):
    """Make the method's loss NaN on the given (1-based) steps; snapshot the student before every step."""
    original = run.method.forward
    snapshots = {}

    def forward(*args, **kwargs):
        step = run.state.step + 1
        snapshots.setdefault(step, {k: v.detach().clone() for k, v in run.student.state_dict().items()})
        out = original(*args, **kwargs)
        return {**out, "distill": out["distill"] * float("nan")} if step in bad_steps else out

    run.method.forward = forward
    return snapshots


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_step_is_skipped_logged_and_training_goes_on(tmp_path, capsys):
    run = trainer(tmp_path, *SMALL, "max_steps=4")
    snapshots = poison(run, {2})
    result = run.train()
    rows = metric_rows(result.metrics_path)
    assert [(r["step"], r["skipped"]) for r in rows] == [(1, False), (2, True), (3, False), (4, False)]
    assert rows[1]["loss"] != rows[1]["loss"]  # NaN logged as is
    assert run.state.skipped_steps == 1 and run.state.consecutive_bad_steps == 0
    assert same_weights(snapshots[2], snapshots[3])  # the bad step changed nothing
    assert not same_weights(snapshots[1], snapshots[2]) and not same_weights(snapshots[3], snapshots[4])
    assert all(torch.isfinite(v).all() for v in run.student.state_dict().values())
    assert "step 2: non-finite loss" in capsys.readouterr().err


@pytest.mark.slow
def test_max_bad_steps_in_a_row_stop_with_a_last_good_checkpoint_that_resumes(tmp_path):
    run = trainer(tmp_path, *SMALL, "max_steps=6", "max_bad_steps=2")
    snapshots = poison(run, {2, 3, 4, 5, 6})
    with pytest.raises(FloatingPointError, match=r"2 consecutive steps.*step 3.*checkpoints/step-3.*resume=true"):
        run.train()
    rows = metric_rows(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["skipped"]) for r in rows] == [(1, False), (2, True), (3, True)]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3]
    saved = load_file(str(tmp_path / "checkpoints" / "step-3" / "model.safetensors"))
    assert saved and all(torch.equal(saved[k], snapshots[2][k]) for k in saved)  # weights of the last good step
    state = json.loads((tmp_path / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert (state["step"], state["skipped_steps"], state["consecutive_bad_steps"]) == (3, 2, 0)

    resumed = trainer(tmp_path, *SMALL, "max_steps=5", "max_bad_steps=2", "resume=true").train()
    rows = metric_rows(resumed.metrics_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and not rows[3]["skipped"] and not rows[4]["skipped"]
    assert (resumed.final_dir / "model.safetensors").exists()


# ----------------------------------------------------------------------------------- atomic checkpoints, resume
def assert_checkpoints_load(output_dir, student_keys):
    checkpoints = list_checkpoints(output_dir)
    assert checkpoints
    for step, path in checkpoints:
        assert json.loads((path / "trainer_state.json").read_text())["step"] == step
        weights = load_file(str(path / "model.safetensors"))
        assert set(weights) <= student_keys and all(torch.isfinite(w).all() for w in weights.values())
        assert not list(path.glob("*.bin")) or (path / "optimizer.bin").exists()  # weights never pickled
        assert not (path / "pytorch_model.bin").exists()
    return checkpoints


@pytest.mark.slow
def test_a_crash_during_a_save_leaves_the_previous_checkpoint_and_resume_finishes(tmp_path):
    run = trainer(tmp_path, *SMALL, "max_steps=4", "save_every=1", "keep_last=5")
    original = run.accelerator.save_state

    def crash_at_step_3(output_dir, **kwargs):
        original(output_dir, **kwargs)
        if run.state.step == 3:  # as if killed while the weights were being written
            (Path(output_dir) / "model.safetensors").write_bytes(b"half a file")
            raise KeyboardInterrupt

    run.accelerator.save_state = crash_at_step_3
    with pytest.raises(KeyboardInterrupt):
        run.train()
    assert (tmp_path / "checkpoints" / ".tmp-step-3").is_dir()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1, 2]

    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 4, "loss": 1.2')  # a metrics line cut short by the same kill

    resumed = trainer(tmp_path, *SMALL, "max_steps=4", "save_every=1", "keep_last=5", "resume=true")
    result = resumed.train()
    assert [r["step"] for r in metric_rows(result.metrics_path)] == [1, 2, 3, 4]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    keys = set(resumed.student.state_dict())
    assert [s for s, _ in assert_checkpoints_load(tmp_path, keys)] == [1, 2, 3, 4]


# The run SIGKILLs itself in its 4th save, after the state is written and before the manifest that completes it: a
# kill mid-save on any machine (polling for a temporary folder from outside can miss every save on a fast one).
KILLED_IN_THE_FOURTH_SAVE = """
import os, signal, sys
from sra_distill.cli import main
from sra_distill.train import engine
write = engine.write_manifest
def write_or_die(folder):
    if folder.name == ".tmp-step-4":
        os.kill(os.getpid(), signal.SIGKILL)
    return write(folder)
engine.write_manifest = write_or_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_mid_save_then_resume(tmp_path):
    out = tmp_path / "run"
    overrides = [*SMALL, "save_every=1", "max_steps=10", "keep_last=3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-c", KILLED_IN_THE_FOURTH_SAVE, "distill", "--config", str(TINY), *overrides,
         f"output_dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    root = out / "checkpoints"
    assert (root / ".tmp-step-4").is_dir()
    assert [step for step, _ in list_checkpoints(out)] == [1, 2, 3]

    resumed = trainer(out, *overrides, "resume=true")
    result = resumed.train()
    assert [r["step"] for r in metric_rows(result.metrics_path)] == list(range(1, 11))
    assert [s for s, _ in assert_checkpoints_load(out, set(resumed.student.state_dict()))] == [8, 9, 10]
    assert not list(root.glob(".tmp-*")) and not list(root.glob(".del-*"))
    assert (result.final_dir / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------- safe loading
class RunsCode:
    """A pickle that runs a command when loaded."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (Path(self.sentinel),))


def test_checkpoint_files_load_weights_only(tmp_path, capsys):
    from sra_distill.run_files import write_manifest
    from sra_distill.train.runfolder import RunFolderError

    trainer(tmp_path, *SMALL, "max_steps=1", "save_every=1").train()
    sentinel = tmp_path / "pwned"
    checkpoint = tmp_path / "checkpoints" / "step-1"
    torch.save({"state": RunsCode(sentinel)}, checkpoint / "optimizer.bin")
    # The manifest no longer matches: the checkpoint is skipped unread.
    with pytest.raises(RunFolderError, match="no intact checkpoint"):
        trainer(tmp_path, *SMALL, "max_steps=2", "resume=true")
    # Re-sealed (as an attacker could): it is read, with weights_only, which refuses the pickle.
    write_manifest(checkpoint)
    with pytest.raises(RunFolderError, match="could be loaded"):
        trainer(tmp_path, *SMALL, "max_steps=2", "resume=true").train()
    assert "it does not load (UnpicklingError" in capsys.readouterr().err
    assert not sentinel.exists()


def test_models_with_custom_code_are_refused_unless_the_config_asks(tmp_path):
    sentinel = tmp_path / "pwned"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(
        {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}}))
    (model_dir / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(str(model_dir), tokenizer="gpt2", arch=ArchSettings(), dtype=torch.float32, seed=0)
    assert not sentinel.exists()


def test_package_audit_no_unsafe_loading():
    """grep -rn "torch.load|trust_remote_code|pickle" src: every torch.load is weights_only, nothing enables remote
    code or unpickles by itself, and every switch defaults to off."""
    import inspect

    from sra_distill.data.tokenization import load_tokenizer as tokenizer_loader
    from sra_distill.evaluation.evaluate import run_evaluate

    sources = {p: p.read_text() for p in (ROOT / "src" / "sra_distill").rglob("*.py")}
    for path, text in sources.items():
        for call in re.finditer(r"torch\.load\(", text):
            assert "weights_only=True" in text[call.start(): text.index(")", call.start()) + 40], path
        assert "trust_remote_code=True" not in text, path
        assert not re.search(r"\bpickle\.loads?\(", text), path
        assert "safe_serialization=False" not in text, path
    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    assert inspect.signature(tokenizer_loader).parameters["trust_remote_code"].default is False
    assert "trust_remote_code" not in inspect.getsource(run_evaluate)  # evaluation loads with the default (off)
    assert Config().trust_remote_code is False and Config().allow_download is False
