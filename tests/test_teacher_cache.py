"""The teacher cache (`sra teacher-cache`, `teacher_cache=DIR`) on the packaged tiny config: cached runs take the same
losses and gradients as live-teacher runs for every cross-tokenizer method; caches for other settings, damaged or
unfinished ones are refused before training; an interrupted build resumes keeping its finished shards."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sra_distill.cli import main
from sra_distill.config import ConfigError, load_config
from sra_distill.paths import CONFIGS_DIR
from sra_distill.train.engine import Trainer, epoch_order, records_read
from sra_distill.train.teacher_cache import (
    MANIFEST_NAME,
    TeacherCacheError,
    build_teacher_cache,
    load_frozen_teacher,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = CONFIGS_DIR / "tiny.yaml"
METHODS = ("sra", "uld", "mined", "dskd", "multilevel_ot", "alm")  # every cross-tokenizer method


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One fp32 cache of the tiny teacher serving all five methods, built through the CLI, 6 records a shard."""
    folder = tmp_path_factory.mktemp("teacher_cache") / "cache"
    code = main(["teacher-cache", "--config", str(TINY), "--output", str(folder), "--methods", ",".join(METHODS),
                 "--dtype", "fp32", "--records-per-shard", "6"])
    assert code == 0
    return folder


def trainer(tmp_path, name, *overrides):
    return Trainer(load_config(TINY, [f"output_dir={tmp_path / name}", *overrides]))


def run_steps(trainer, steps):
    """(metrics, gradients) of `steps` optimiser steps; the gradients as the optimiser receives them (clipped)."""
    grads = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads.append([p.grad.clone() for g in trainer.optimizer.param_groups for p in g["params"]
                      if p.grad is not None])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    trainer.student.train()
    batches = trainer._micro_batches()
    try:
        metrics = [trainer.train_step(next(batches)) for _ in range(steps)]
    finally:
        trainer.close()
    return metrics, grads


@pytest.mark.parametrize(("method", "grad_accum"), [(m, 2) for m in METHODS] + [("sra", 1)])
def test_cached_run_takes_the_live_teachers_losses_and_gradients(cache, tmp_path, method, grad_accum):
    settings = [f"method={method}", f"grad_accum={grad_accum}", "batch_size=2"]
    live_metrics, live_grads = run_steps(trainer(tmp_path, "live", *settings), 2)
    cached = trainer(tmp_path, "cached", *settings, f"teacher_cache={cache}")
    assert cached.teacher is None  # only the head came from the cache
    cached_metrics, cached_grads = run_steps(cached, 2)
    assert len(live_grads) == len(cached_grads) == 2
    for live, got in zip(live_metrics, cached_metrics):
        assert live.keys() == got.keys()
        for name in live:
            assert got[name] == pytest.approx(live[name], rel=1e-6, abs=1e-6), name
    for live_step, cached_step in zip(live_grads, cached_grads):
        assert len(live_step) == len(cached_step) > 0
        for live, got in zip(live_step, cached_step):
            torch.testing.assert_close(got, live, rtol=1e-6, atol=1e-6)


def test_teacher_cache_auto_builds_on_first_use_and_later_runs_reuse_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SRA_CACHE", str(tmp_path / "sra-cache"))
    settings = ["method=uld", "batch_size=2", "max_train_examples=8"]  # 4 steps x 2 = one epoch: auto builds
    live_metrics, _ = run_steps(trainer(tmp_path, "live", *settings), 2)
    first = trainer(tmp_path, "first", *settings, "teacher_cache=auto")
    assert "teacher cache: building" in capsys.readouterr().out and first.teacher is None
    (folder,) = [p for p in (tmp_path / "sra-cache" / "teacher-caches").iterdir() if p.is_dir()]  # and its .lock
    manifest = folder / "manifest.json"
    built = manifest.stat().st_mtime_ns
    first_metrics, _ = run_steps(first, 2)
    for live, got in zip(live_metrics, first_metrics):  # the tiny teacher is fp32: the cache is exact
        for name in live:
            assert got[name] == pytest.approx(live[name], rel=1e-6, abs=1e-6), name
    # Another learning rate and step count: nothing the cache depends on, so the same cache is read again.
    second = trainer(tmp_path, "second", *settings, "teacher_cache=auto", "lr=3e-3", "max_steps=2")
    assert f"teacher cache: reusing {folder}" in capsys.readouterr().out
    second.close()
    assert [p.name for p in (tmp_path / "sra-cache" / "teacher-caches").iterdir() if p.is_dir()] == [folder.name]
    assert manifest.stat().st_mtime_ns == built
    # Another training length changes the records a cache holds: a new cache.
    other = trainer(tmp_path, "other", *settings, "teacher_cache=auto", "max_length=96")
    assert "teacher cache: building" in capsys.readouterr().out
    other.close()
    assert len([p for p in (tmp_path / "sra-cache" / "teacher-caches").iterdir() if p.is_dir()]) == 2


def test_teacher_cache_auto_runs_the_live_teacher_for_a_run_shorter_than_an_epoch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SRA_CACHE", str(tmp_path / "sra-cache"))
    settings = ["method=uld", "batch_size=2", "max_steps=2"]  # reads 4 of the 16 records
    live_metrics, live_grads = run_steps(trainer(tmp_path, "live", *settings), 2)
    short = trainer(tmp_path, "short", *settings, "teacher_cache=auto")
    assert "teacher cache: not built (teacher_cache=auto)" in capsys.readouterr().out
    assert short.teacher is not None and short.teacher_cache is None
    assert not any(p.is_dir() for p in (tmp_path / "sra-cache" / "teacher-caches").iterdir())
    metrics, grads = run_steps(short, 2)
    assert metrics == live_metrics  # the same run: the teacher loaded later, with the RNG state kept
    for live_step, step in zip(live_grads, grads):
        for live, got in zip(live_step, step):
            assert torch.equal(live, got)


def test_records_read_are_the_records_a_run_reads(tmp_path):
    cfg = load_config(TINY, ["batch_size=3", "grad_accum=2", "max_steps=2", "seed=7"])
    assert records_read(cfg, 16) == sorted(epoch_order(7, 0, 16)[:12])  # 2 steps x 2 micro-batches x 3
    # 7 steps = 14 batches: the first epoch's 6 (the last one short), then 8 of the second: every record.
    assert records_read(load_config(TINY, ["batch_size=3", "grad_accum=2", "max_steps=7"]), 16) == list(range(16))
    two = load_config(TINY, ["max_steps=1", "batch_size=2", "seed=3"])  # each process takes its own batch
    assert records_read(two, 16, num_processes=2) == sorted(epoch_order(3, 0, 16)[:4])

    run = trainer(tmp_path, "order", "batch_size=3", "grad_accum=2", "max_steps=2", "seed=7")
    batches = run._micro_batches()
    read = {tuple(ids[mask.bool()].tolist()) for group in (next(batches), next(batches)) for batch in group
            for ids, mask in zip(batch.teacher.input_ids, batch.teacher.attention_mask)}
    run.close()
    assert read == {tuple(run.dataset[i].teacher.input_ids) for i in records_read(cfg, 16)}


def test_a_cache_of_the_records_a_run_reads_serves_it_as_the_live_teacher(tmp_path):
    """What `sra compare` builds per seed: only the records its runs read, with each run's method and settings."""
    settings = ["batch_size=2", "grad_accum=2", "max_steps=3", "seed=5", "progress=false"]
    configs = [load_config(TINY, [*settings, f"method={m}"]) for m in ("sra", "mined")]
    read = records_read(configs[0], 16)
    assert len(read) == 12
    folder = tmp_path / "subset"
    build_teacher_cache(configs[0], folder, serves=configs, records=read, dtype="fp32")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert len(manifest["index"]) == 12 and manifest["settings"]["record_subset"]
    for method in ("sra", "mined"):
        live, _ = run_steps(trainer(tmp_path, f"live-{method}", *settings, f"method={method}"), 3)
        cached, _ = run_steps(trainer(tmp_path, f"cached-{method}", *settings, f"method={method}",
                                      f"teacher_cache={folder}"), 3)
        for live_step, cached_step in zip(live, cached):
            for name in live_step:
                assert cached_step[name] == pytest.approx(live_step[name], rel=1e-6, abs=1e-6), (method, name)
    longer = trainer(tmp_path, "longer", *settings[:-3], "max_steps=8", "seed=5", f"teacher_cache={folder}")
    with pytest.raises(TeacherCacheError, match="a batch record is not in the cache"):
        run_steps(longer, 8)  # two epochs: records the cache was not built over
    with pytest.raises(ConfigError, match="record indices must lie in 0..15"):
        build_teacher_cache(configs[0], tmp_path / "bad", records=[3, 16])


def test_a_cache_built_with_other_settings_is_refused_naming_them(cache, tmp_path):
    with pytest.raises(TeacherCacheError, match=r"other settings: max_length: cache 128, this run 96"):
        trainer(tmp_path, "run", "max_length=96", f"teacher_cache={cache}")
    with pytest.raises(TeacherCacheError, match=r"max_train_examples: cache 16, this run 8"):
        trainer(tmp_path, "run", "max_train_examples=8", f"teacher_cache={cache}")


def test_a_damaged_shard_is_refused_before_training(cache, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(cache, damaged)
    shard = damaged / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # one byte of a stored state
    shard.write_bytes(bytes(data))
    with pytest.raises(TeacherCacheError, match=r"shard-00001.safetensors is missing or damaged"):
        trainer(tmp_path, "run", f"teacher_cache={damaged}")


def test_an_unfinished_cache_is_refused(cache, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(cache, unfinished)
    (unfinished / MANIFEST_NAME).unlink()
    with pytest.raises(TeacherCacheError, match=r"no manifest.json, so not a finished teacher cache"):
        trainer(tmp_path, "run", f"teacher_cache={unfinished}")


def test_a_cache_without_the_layers_a_method_reads_is_refused(cache, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(cache, partial)
    manifest = json.loads((partial / MANIFEST_NAME).read_text())
    manifest["settings"]["layout"]["attention"] = []  # as if built for methods that read no attention row
    (partial / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(TeacherCacheError, match=r"does not hold what method 'sra' reads: attention rows"):
        trainer(tmp_path, "run", f"teacher_cache={partial}")


def test_on_policy_steps_with_a_cache_are_refused(cache, tmp_path):
    with pytest.raises(ConfigError, match=r"on_policy.ratio > 0: on-policy steps need the live teacher"):
        trainer(tmp_path, "run", "on_policy.ratio=0.5", f"teacher_cache={cache}")


def test_an_interrupted_build_resumes_keeping_its_finished_shards(cache, tmp_path):
    # A build stopped while writing its second shard: the first shard and the settings on disk, nothing else.
    folder = tmp_path / "resumed"
    folder.mkdir()
    for name in ("build.json", "shard-00000.safetensors"):
        shutil.copy2(cache / name, folder / name)
    (folder / "shard-00001.safetensors.tmp").write_bytes(b"half a shard")
    kept = (folder / "shard-00000.safetensors").stat()
    cfg = load_config(TINY, ["progress=false"])
    build_teacher_cache(cfg, folder, methods=list(METHODS), dtype="fp32", records_per_shard=6)
    after = (folder / "shard-00000.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)  # not rewritten
    original, resumed = (json.loads((f / MANIFEST_NAME).read_text()) for f in (cache, folder))
    assert resumed["index"] == original["index"]
    assert resumed["files"] == original["files"]  # byte-identical shards and head


def test_a_build_into_a_cache_of_other_settings_is_refused(cache, tmp_path):
    folder = tmp_path / "other"
    shutil.copytree(cache, folder)
    cfg = load_config(TINY, ["progress=false", "max_length=96"])
    with pytest.raises(TeacherCacheError, match=r"built with other settings \(.*max_length: cache 128, this run 96"):
        build_teacher_cache(cfg, folder, methods=list(METHODS), dtype="fp32", records_per_shard=6)


@pytest.mark.parametrize("method", ["sra", "uld"])
def test_a_cache_in_a_lower_precision_stays_within_its_tolerance(tmp_path_factory, tmp_path, method):
    # The tiny teacher runs in fp32; a bf16 cache rounds its states (uld: logits recomputed from bf16 states).
    folder = tmp_path_factory.mktemp("bf16") / "cache"
    build_teacher_cache(load_config(TINY, ["progress=false"]), folder, methods=["sra", "uld"], dtype="bf16")
    with safe_open(folder / "shard-00000.safetensors", "pt") as shard:
        assert {shard.get_tensor(n).dtype for n in shard.keys() if ".h" in n} == {torch.bfloat16}  # noqa: SIM118
    settings = [f"method={method}", "batch_size=2"]
    live_metrics, live_grads = run_steps(trainer(tmp_path, "live", *settings), 1)
    cached_metrics, cached_grads = run_steps(trainer(tmp_path, "cached", *settings, f"teacher_cache={folder}"), 1)
    assert cached_metrics[0]["ce"] == live_metrics[0]["ce"]  # the student's side is untouched
    assert cached_metrics[0]["distill"] == pytest.approx(live_metrics[0]["distill"], rel=2e-2)
    for live, got in zip(live_grads[0], cached_grads[0]):
        torch.testing.assert_close(got, live, rtol=5e-2, atol=1e-3)


@pytest.mark.slow
def test_resuming_a_cached_run_reproduces_the_uninterrupted_one(cache, tmp_path):
    settings = [f"teacher_cache={cache}", "save_every=2", "keep_last=5", "batch_size=2"]
    full = trainer(tmp_path, "full", *settings).train()
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(full.output_dir / "checkpoints" / "step-2", resumed_dir / "checkpoints" / "step-2")
    resumed = trainer(tmp_path, "resumed", *settings, "resume=true").train()
    rows = lambda path: [json.loads(line) for line in Path(path).read_text().splitlines()]
    expected = {row["step"]: row for row in rows(full.metrics_path)}
    got = rows(resumed.metrics_path)
    assert [row["step"] for row in got] == [3, 4]  # the folder held the checkpoint only, no earlier rows
    for row in got:
        for name in ("loss", "ce", "distill", "cos", "geo", "kl", "grad_norm"):
            assert row[name] == pytest.approx(expected[row["step"]][name], rel=1e-6, abs=1e-7), name


# The build process SIGKILLs itself the moment its 2nd shard is on disk: a kill mid-way wherever the machine's speed
# (polling for the file from here raced a fast machine, which finished the build before the signal arrived).
KILLED_AFTER_TWO_SHARDS = """
import os, signal, sys
from sra_distill.cli import main
from sra_distill.train import teacher_cache
save = teacher_cache._save_atomically
def save_then_die(tensors, path, metadata):
    save(tensors, path, metadata)
    if path.name == "shard-00001.safetensors":
        os.kill(os.getpid(), signal.SIGKILL)
teacher_cache._save_atomically = save_then_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_build_killed_mid_way_resumes_to_the_same_cache(cache, tmp_path):
    folder = tmp_path / "killed"
    command = [sys.executable, "-c", KILLED_AFTER_TWO_SHARDS, "teacher-cache", "--config", str(TINY),
               "--output", str(folder), "--methods", ",".join(METHODS), "--dtype", "fp32", "--records-per-shard", "2",
               "progress=false"]
    done = subprocess.run(command, env=os.environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert (folder / "shard-00001.safetensors").exists()
    assert not (folder / MANIFEST_NAME).exists()
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.safetensors")}
    build_teacher_cache(load_config(TINY, ["progress=false"]), folder, methods=list(METHODS), dtype="fp32",
                        records_per_shard=2)
    assert {name: (folder / name).stat().st_mtime_ns for name in kept} == kept  # finished shards kept as they were
    original, resumed = (json.loads((f / MANIFEST_NAME).read_text()) for f in (cache, folder))
    assert resumed["index"].keys() == original["index"].keys()
    for key, (shard, _, _) in resumed["index"].items():
        with safe_open(folder / shard, "pt") as got, safe_open(cache / original["index"][key][0], "pt") as want:
            names = [name for name in want.keys() if name.startswith(key)]  # noqa: SIM118
            assert names
            for name in names:  # other shards batch other records: padding moves float sums by ~1e-7
                torch.testing.assert_close(got.get_tensor(name), want.get_tensor(name), rtol=1e-6, atol=1e-6)


def torchrun(*args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "sra_distill", *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, check=False, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.mark.slow
def test_two_processes_build_disjoint_shards_and_train_from_the_cache_like_one_live_process(cache, tmp_path):
    folder = tmp_path / "two_process_cache"
    torchrun("teacher-cache", "--config", str(TINY), "--output", str(folder), "--methods", ",".join(METHODS),
             "--dtype", "fp32", "--records-per-shard", "6", "progress=false")
    original, built = (json.loads((f / MANIFEST_NAME).read_text()) for f in (cache, folder))
    assert built["index"].keys() == original["index"].keys()
    assert sorted(built["files"]) == sorted(original["files"])  # shards 0 and 2 from rank 0, shard 1 from rank 1
    # 2 processes x batch 2 reading the cache train as 1 process x batch 4 with the live teacher.
    comparable = ["student_arch.dropout=0", "max_train_examples=16", "max_steps=4"]
    torchrun("distill", "--config", str(TINY), f"output_dir={tmp_path / 'two'}", *comparable, "batch_size=2",
             f"teacher_cache={folder}")
    Trainer(load_config(TINY, [f"output_dir={tmp_path / 'one'}", *comparable, "batch_size=4"])).train()
    read = lambda run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    expected = {row["step"]: row for row in read("one")}
    got = read("two")
    assert [row["step"] for row in got] == [1, 2, 3, 4] and all(row["world_size"] == 2 for row in got)
    for row in got:
        for name in ("loss", "ce", "distill", "cos", "geo", "kl", "grad_norm"):
            assert row[name] == pytest.approx(expected[row["step"]][name], rel=1e-4, abs=1e-6), (row["step"], name)


@pytest.mark.parametrize("precision, capability, warned", [("bf16", "AVX2", True), ("bf16", "AVX512", False),
                                                           ("fp32", "AVX2", False)])
def test_a_half_precision_teacher_on_a_cpu_without_avx512_is_warned_about(monkeypatch, capsys, precision, capability,
                                                                          warned):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    teacher, _ = load_frozen_teacher(load_config(TINY, [f"teacher_precision={precision}"]))
    assert next(teacher.parameters()).dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    err = capsys.readouterr().err
    assert ("warning: teacher_precision=bf16 on a CPU without AVX-512 (torch reports AVX2)" in err) == warned
    assert ("teacher_precision=fp32 runs the teacher's forward ~4x faster" in err) == warned
