"""Many processes on CPU (gloo): N processes x batch b must train exactly like one process x batch N*b.

Each comparison runs the tiny config for 4 steps (16 records, a multiple of every global batch used, so accelerate's
`even_batches` never pads with repeated samples) with the student's dropout off: dropout draws from each process's
own RNG stream, which no number of processes can reproduce. The teacher is seeded, hence identical on every rank.
Subprocesses run with `torchrun --standalone` / `accelerate launch` on a free port and OMP_NUM_THREADS=1.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sra_distill.config import ConfigError, load_config
from sra_distill.run_files import list_checkpoints
from sra_distill.train.engine import Trainer, finite_on_every_process

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "src/sra_distill/configs/tiny.yaml"
COMPARABLE = ["student_arch.dropout=0", "max_train_examples=16", "max_steps=4"]
COMPARED = ("loss", "ce", "distill", "cos", "geo", "kl", "lr", "grad_norm")

# Run as a script under a launcher: build the trainer, record how the teacher's first block is held, then train.
SHARDED_TEACHER_PROBE = """
import json, sys
from torch.distributed.tensor import DTensor
from sra_distill.config import load_config
from sra_distill.train.engine import Trainer

trainer = Trainer(load_config(sys.argv[1], sys.argv[2:]))
weight = next(trainer.teacher.model.layers[0].parameters())
if trainer.accelerator.is_main_process:
    (trainer.output_dir / "probe.json").parent.mkdir(parents=True, exist_ok=True)
    (trainer.output_dir / "probe.json").write_text(json.dumps({
        "dtensor": isinstance(weight, DTensor), "full_rows": weight.shape[0],
        "local_rows": weight.to_local().shape[0] if isinstance(weight, DTensor) else weight.shape[0],
        "embedding_is_dtensor": isinstance(trainer.teacher.model.embed_tokens.weight, DTensor),
    }))
trainer.train()
"""


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(command: list[str], expect_ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def torchrun_distill(output_dir: Path, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return launch([
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "-m", "sra_distill", "distill", "--config", str(TINY), f"output_dir={output_dir}", *COMPARABLE, *overrides,
    ])


def accelerate_launch(accelerate_config: str, script: list[str], expect_ok: bool = True):
    return launch([
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "configs" / "accelerate" / accelerate_config), "--num_processes", "2",
        "--main_process_port", str(free_port()), *script,
    ], expect_ok)


def in_process(output_dir: Path, *overrides: str):
    return Trainer(load_config(TINY, [f"output_dir={output_dir}", *COMPARABLE, *overrides])).train()


def rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(got_dir: Path, expected_dir: Path, steps=(1, 2, 3, 4)):
    expected = {r["step"]: r for r in rows(expected_dir)}
    got = rows(got_dir)
    assert [r["step"] for r in got] == list(steps)  # one row per step: only the main process logs
    for r in got:
        for key in COMPARED:
            assert r[key] == pytest.approx(expected[r["step"]][key], rel=1e-4, abs=1e-6), (r["step"], key)
    a = load_file(Path(expected_dir) / "final" / "model.safetensors")
    b = load_file(Path(got_dir) / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.fixture(scope="module")
def one_process_batch4(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process_batch4")
    in_process(out, "batch_size=4")
    return out


@pytest.fixture(scope="module")
def two_processes_batch2(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_processes_batch2")
    done = torchrun_distill(out, "batch_size=2", "save_every=2", "keep_last=5")
    return out, done


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_the_global_batch(one_process_batch4, two_processes_batch2):
    out, done = two_processes_batch2
    assert_same_training(out, one_process_batch4)
    assert all(r["world_size"] == 2 for r in rows(out))
    assert done.stdout.count("Distilled ") == 1  # the summary (and every file) comes from the main process
    assert [step for step, _ in list_checkpoints(out)] == [2, 4]
    # accelerate writes one RNG state per process: the checkpoint really came from two processes.
    assert sorted(p.name for p in (out / "checkpoints" / "step-2").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert not list(out.glob("**/*.tmp")) and not list((out / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_two_process_checkpoint_resumes_with_two_processes(two_processes_batch2, tmp_path):
    full, _ = two_processes_batch2
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    torchrun_distill(resumed, "batch_size=2", "save_every=2", "keep_last=5", "resume=true")
    assert_same_training(resumed, full, steps=(3, 4))


def test_gradient_accumulation_matches_the_larger_batch(one_process_batch4, tmp_path):
    in_process(tmp_path, "batch_size=2", "grad_accum=2")
    assert_same_training(tmp_path, one_process_batch4)


@pytest.mark.slow
def test_teacher_sharded_over_processes_gives_the_same_training(one_process_batch4, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SHARDED_TEACHER_PROBE)
    out = tmp_path / "run"
    accelerate_launch("ddp.yaml", [str(script), str(TINY), f"output_dir={out}", *COMPARABLE, "batch_size=2",
                                   "teacher_sharding=fsdp"])
    probe = json.loads((out / "probe.json").read_text())
    assert probe["dtensor"] and probe["local_rows"] * 2 == probe["full_rows"], probe  # half of each block per rank
    assert not probe["embedding_is_dtensor"], probe  # embeddings / head stay whole (see shard_teacher)
    assert_same_training(out, one_process_batch4)


@pytest.mark.slow
def test_fsdp_student_config_on_cpu_is_refused_not_ignored(tmp_path):
    done = accelerate_launch("fsdp_student.yaml", ["-m", "sra_distill", "distill", "--config", str(TINY),
                                                   f"output_dir={tmp_path}"], expect_ok=False)
    assert done.returncode != 0
    assert "asks for FSDP" in done.stderr and "configs/accelerate/ddp.yaml" in done.stderr, done.stderr[-3000:]


def test_unknown_teacher_sharding_is_named(tmp_path):
    with pytest.raises(ConfigError, match="teacher_sharding.*none, fsdp.*'zero3'"):
        Trainer(load_config(TINY, [f"output_dir={tmp_path}", "teacher_sharding=zero3"]))


def test_dropout_setting_reaches_the_random_architectures():
    from sra_distill.config import ArchSettings
    from sra_distill.data.tokenization import load_tokenizer
    from sra_distill.models.load import random_model

    tokenizer = load_tokenizer("gpt2")
    small = dict(hidden_size=16, num_layers=1, num_heads=2, max_positions=32)
    default = random_model("gpt2", ArchSettings(**small), tokenizer, seed=0).config
    assert (default.resid_pdrop, default.embd_pdrop, default.attn_pdrop) == (0.1, 0.1, 0.1)
    off = random_model("gpt2", ArchSettings(**small, dropout=0.0), tokenizer, seed=0).config
    assert (off.resid_pdrop, off.embd_pdrop, off.attn_pdrop) == (0.0, 0.0, 0.0)
    llama = random_model("llama", ArchSettings(**small, dropout=0.2), tokenizer, seed=0).config
    assert llama.attention_dropout == 0.2


class TwoProcessReduce:
    """An accelerator stand-in for a two-process world: `reduce` combines this process's tensor with the other
    process's value the way accelerate does (max for "max"; any other word, "min" included, sums)."""

    device = torch.device("cpu")

    def __init__(self, other_process_value: float):
        self.other = other_process_value

    def reduce(self, tensor, reduction="mean"):
        other = torch.full_like(tensor, self.other)
        return torch.maximum(tensor, other) if reduction == "max" else tensor + other


@pytest.mark.parametrize("here_finite, there_finite", [(True, True), (True, False), (False, True), (False, False)])
def test_every_process_skips_the_step_when_any_one_has_a_non_finite_loss(here_finite, there_finite):
    # The other process's flag as `finite_on_every_process` sends it: 1.0 = non-finite there.
    there = TwoProcessReduce(other_process_value=0.0 if there_finite else 1.0)
    assert finite_on_every_process(there, here_finite) is (here_finite and there_finite)
