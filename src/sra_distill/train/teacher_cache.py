"""Run the teacher once: a cache of what the methods read from the frozen teacher, built once, read every epoch.

Everything a cross-tokenizer method takes from the teacher is a function of its hidden states at a few layers, the
last token's attention row at a few layers, and its LM head (DSKD: also its input embeddings). `build_teacher_cache`
runs the teacher over the training records a config selects, paired and collated exactly as training pairs them
(same teacher token ids), and stores per record:

* `<key>.h<layer>`: the hidden states of every layer the method(s) need, from position `response_start - 1` (the
  row predicting the first response token) to the last real token, in the cache dtype. The prompt rows before it
  are never read: spans lie in the response and every logit-based method masks rows by their response targets.
* `<key>.a<layer>`: the last real token's attention row over all real tokens (float32, as `capture` returns it).
* `<key>.logits` only when the teacher's logits are not its head applied to the final-norm states (soft-capping,
  scaling); otherwise logits are recomputed from `h<num_layers>` and the stored head, which is exact and 1/V the
  disk.

`<key>` is a hash of the record's teacher token ids, so a batch finds its records whatever the epoch order, batch
size or process count. Files: `shard-NNNNN.safetensors` (memory-mapped reads; each shard covers a fixed slice of the
records and is written atomically, so an interrupted build keeps the finished ones and resumes), `head.safetensors`
(the LM head, and the input embeddings when they are not the same tensor), `build.json` (the settings, written
first: a resume with other settings is refused) and `manifest.json` (settings, index, sizes and sha256 of every
file), written last: a folder without it is an unfinished build.

`teacher_cache=auto` builds the cache on first use under the cache folder (`auto_cache_folder`) and reuses it.

Reading (`TeacherCache.open`) refuses a cache built with other settings (naming them) or whose files do not match
their checksums, before anything trains; `TeacherCache.view` assembles a batch's teacher `ModelView` from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import skip_init
from tqdm.auto import tqdm

from sra_distill.config import Config, config_to_dict, load_config, method_settings
from sra_distill.data.batch import ModelView, SideBatch
from sra_distill.data.collate import PairedCollator, PairedDataset
from sra_distill.data.records import DataError, load_records_with_report
from sra_distill.data.tokenization import load_tokenizer
from sra_distill.errors import ConfigError
from sra_distill.losses.base import Needs
from sra_distill.losses.fused_span_kl import slow_half_products
from sra_distill.models.capture import capture
from sra_distill.models.load import load_model
from sra_distill.models.sources import local_path, resolve_model_source
from sra_distill.paths import cache_dir, resolve_config, resolve_data_path
from sra_distill.train.methods import build_method
from sra_distill.validation import validate_settings

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
BUILD_NAME = "build.json"
HEAD_NAME = "head.safetensors"
CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RECORDS_PER_SHARD = 256
_HASH_CHUNK = 1 << 20


class TeacherCacheError(ConfigError):
    """A teacher cache that does not fit the run (other settings) or is damaged or unfinished."""


# ------------------------------------------------------------------------------------------------ fingerprints
def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files_fingerprint(folder: Path) -> str:
    """Name, size and sha256 of the head and tail MiB of every file in a model folder: weights tens of GB large are
    told apart without reading them whole (a changed file changes its size, header or last bytes)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}:{size}:".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(_HASH_CHUNK))
            if size > 2 * _HASH_CHUNK:
                handle.seek(-_HASH_CHUNK, os.SEEK_END)
                digest.update(handle.read(_HASH_CHUNK))
    return digest.hexdigest()


def teacher_fingerprint(cfg: Config) -> str:
    """What identifies the teacher's weights: its files (a folder, a converted GGUF, the hub snapshot), or for a
    random teacher its architecture and initialisation seed (the engine initialises it with seed + 1)."""
    if cfg.teacher.startswith("random:"):
        return json.dumps({"arch": dataclasses.asdict(cfg.teacher_arch), "seed": cfg.seed + 1}, sort_keys=True)

    location = resolve_model_source(cfg.teacher)
    folder = local_path(location)
    if folder is None:  # a hub id: its cached snapshot, which is what loads without downloads
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(location, local_files_only=not cfg.allow_download))
    return _files_fingerprint(folder)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id) and the special tokens: what pairing and the spans read."""
    digest = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def data_fingerprint(train_data: str) -> str:
    path = resolve_data_path(train_data)
    return _sha256_file(path) if path.is_file() else f"dataset:{train_data}"  # a `datasets` name: by name


def cache_settings(cfg: Config, student_tokenizer, teacher_tokenizer) -> dict[str, Any]:
    """The settings that shape the cached teacher states; a cache is used only by a run whose settings equal these."""
    adapter = cfg.teacher_adapter
    return {
        "teacher": cfg.teacher,
        "teacher_files": teacher_fingerprint(cfg),
        "teacher_adapter": None if adapter is None else _files_fingerprint(Path(adapter)),
        "teacher_precision": cfg.teacher_precision,
        "teacher_tokenizer": tokenizer_fingerprint(teacher_tokenizer),
        "student_tokenizer": tokenizer_fingerprint(student_tokenizer),
        "train_data": data_fingerprint(cfg.train_data),
        "max_train_examples": cfg.max_train_examples,
        "max_length": cfg.max_length,
        "max_prompt_length": cfg.max_prompt_length,
    }


def auto_cache_folder(cfg: Config, student_tokenizer, teacher_tokenizer) -> Path:
    """`teacher_cache=auto`: the folder under `$SRA_CACHE/teacher-caches/` for this run's teacher, tokenizers, data,
    lengths and method. Runs that differ only in what the cache does not depend on (seed, learning rate, steps,
    epochs, batch size, alpha, process count) share it; a change of the method's own settings gets a new one, since
    some of them choose the layers it stores."""
    key = {**cache_settings(cfg, student_tokenizer, teacher_tokenizer), "method": cfg.method,
           "method_settings": config_to_dict(method_settings(cfg))}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir() / "teacher-caches" / f"{cfg.method}-{digest}"


def describe_differences(built: dict[str, Any], wanted: dict[str, Any]) -> str:
    return "; ".join(f"{key}: cache {built.get(key)!r}, this run {wanted.get(key)!r}"
                     for key in sorted(built.keys() | wanted.keys()) if built.get(key) != wanted.get(key))


# ------------------------------------------------------------------------------------------------ the teacher
def load_frozen_teacher(cfg: Config):
    """(teacher, tokenizer) as training loads them: the config's precision, its adapter merged, eval mode, frozen."""

    teacher, tokenizer = load_model(
        cfg.teacher, tokenizer=cfg.teacher_tokenizer, arch=cfg.teacher_arch, dtype=cfg.teacher_precision,
        seed=cfg.seed + 1, trust_remote_code=cfg.trust_remote_code, allow_download=cfg.allow_download,
    )
    if cfg.teacher_adapter:
        from peft import PeftModel

        teacher = PeftModel.from_pretrained(teacher, cfg.teacher_adapter).merge_and_unload()
    if cfg.teacher_precision != "fp32" and not torch.accelerator.is_available() \
            and slow_half_products(torch.device("cpu")):
        print(f"warning: teacher_precision={cfg.teacher_precision} on a CPU without AVX-512 (torch reports "
              f"{torch.backends.cpu.get_cpu_capability()}): its half-precision matrix products are slow here; "
              "teacher_precision=fp32 runs the teacher's forward ~4x faster", file=sys.stderr, flush=True)
    return teacher.eval().requires_grad_(False), tokenizer


def teacher_tokenizer_of(cfg: Config):
    """The teacher's tokenizer without its weights (the `teacher_tokenizer` setting, else the model's own)."""

    name = cfg.teacher_tokenizer or resolve_model_source(cfg.teacher)
    return load_tokenizer(name, cfg.trust_remote_code, not cfg.allow_download)


def record_key(input_ids: torch.Tensor) -> str:
    """The cache key of one record: a hash of its real teacher token ids (int64)."""
    return hashlib.sha256(input_ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:32]


class TeacherHead(nn.Module):
    """The frozen teacher's LM head and input embeddings, loaded from a cache instead of the whole model. It answers
    what the methods' set-up reads from a teacher (`get_input_embeddings`, `get_output_embeddings`, `config`)."""

    def __init__(self, tensors: dict[str, torch.Tensor], config):
        super().__init__()
        # Built from the stored tensors with no initialisation: drawing from the global RNG would change the
        # student's dropout draws, so a cached run would no longer follow the live one.
        weight = tensors["lm_head.weight"]
        self.lm_head = skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias="lm_head.bias" in tensors)
        self.lm_head.weight = nn.Parameter(weight, requires_grad=False)
        if "lm_head.bias" in tensors:
            self.lm_head.bias = nn.Parameter(tensors["lm_head.bias"], requires_grad=False)
        self.embed_tokens = nn.Embedding.from_pretrained(tensors.get("embed_tokens.weight", weight))
        if "embed_tokens.weight" not in tensors:  # tied: one parameter, as in the model (moved to a device once)
            self.embed_tokens.weight = self.lm_head.weight
        self.config = config
        self.requires_grad_(False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head


# ------------------------------------------------------------------------------------------------ build
@dataclasses.dataclass(frozen=True)
class Layout:
    """What a cache holds per record: hidden layers, attention layers (block indices; `num_layers` = final norm),
    and how logits are served ("none", "head": recomputed from the stored head, "stored")."""

    hidden: tuple[int, ...]
    attention: tuple[int, ...]
    logits: str
    num_layers: int

    @classmethod
    def for_needs(cls, needs: list[Needs], num_layers: int, logits_from_head: bool) -> Layout:
        """The union of what `needs` read from a teacher of `num_layers` blocks."""
        canonical = lambda layers: {num_layers if layer == -1 else layer for layer in layers}
        hidden = set().union(*(canonical(n.teacher_hidden_layers) for n in needs))
        attention = set().union(*(canonical(n.teacher_attention_layers) for n in needs))
        wants_logits = any(n.teacher_logits for n in needs)
        if wants_logits and logits_from_head:
            hidden.add(num_layers)  # logits = head(final-norm states), recomputed when read
        logits = "none" if not wants_logits else "head" if logits_from_head else "stored"
        return cls(tuple(sorted(hidden)), tuple(sorted(attention)), logits, num_layers)

    def covers(self, needs: Needs) -> list[str]:
        """What `needs` asks of the teacher that this layout lacks (empty: it serves them)."""
        canonical = lambda layers: {self.num_layers if layer == -1 else layer for layer in layers}
        missing = []
        if lacking := sorted(canonical(needs.teacher_hidden_layers) - set(self.hidden)):
            missing.append(f"hidden states of teacher layers {lacking}")
        if lacking := sorted(canonical(needs.teacher_attention_layers) - set(self.attention)):
            missing.append(f"attention rows of teacher layers {lacking}")
        if needs.teacher_logits and self.logits == "none":
            missing.append("teacher logits")
        return missing


def methods_needs(configs: list[Config], student, teacher, student_tokenizer, teacher_tokenizer) -> list[Needs]:
    """The `needs()` of each config's method, with its settings, for this pair (built as training builds them,
    then dropped)."""
    needs = []
    for method_cfg in configs:
        if not method_settings(method_cfg).uses_teacher:
            raise ConfigError(f"method {method_cfg.method!r} never runs the teacher: it has nothing to cache")
        needs.append(build_method(method_cfg, student, teacher, student_tokenizer, teacher_tokenizer)[0].needs())
    return needs


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _record_tensors(view: ModelView, side: SideBatch, row: int, layout: Layout, dtype: torch.dtype):
    """(key, tensors, first stored position) of one record of a captured batch."""
    positions = side.attention_mask[row].nonzero().squeeze(-1)
    first = max(int(side.response_start[row]) - 1, 0)
    tensors = {}
    key = record_key(side.input_ids[row, positions])
    for layer in layout.hidden:
        tensors[f"{key}.h{layer}"] = view.hidden[layer][row, positions[first:]].to(dtype).contiguous()
    for layer in layout.attention:
        tensors[f"{key}.a{layer}"] = view.attention_row[layer][row, positions].float().contiguous()
    if layout.logits == "stored":
        tensors[f"{key}.logits"] = view.logits[row, positions[first:]].to(dtype).contiguous()
    return key, tensors, first


def _save_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)  # a shard on disk under its name is complete


def _start_build(output: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Create the folder and record the settings first; an unfinished build with the same settings resumes."""
    build = output / BUILD_NAME
    if build.is_file() and not overwrite:
        built = json.loads(build.read_text())
        if built != settings:
            raise TeacherCacheError(f"{output} holds a teacher cache built with other settings "
                                    f"({describe_differences(built, settings)}); use another folder or --overwrite")
        return
    if output.exists() and any(output.iterdir()) and not (overwrite and build.is_file()):
        raise TeacherCacheError(f"{output}: exists and is not a teacher cache; give an empty or new folder")
    for path in output.glob("*") if overwrite else ():
        path.unlink()
    output.mkdir(parents=True, exist_ok=True)
    build.write_text(json.dumps(settings, indent=1))


def build_teacher_cache(
    cfg: Config, output: str | Path, methods: list[str] | None = None, dtype: str | None = None,
    records_per_shard: int = RECORDS_PER_SHARD, overwrite: bool = False, accelerator=None,
    serves: list[Config] | None = None, records: list[int] | None = None,
) -> Path:
    """Run the teacher once over `cfg`'s training records and write the cache to `output` (see the module docstring).

    methods: the methods it must serve with `cfg`'s settings (default: `cfg.method`); serves: instead, the configs of
    the runs it must serve, each method with its own settings; their needs are merged. records: only these indices of
    the training records (the ones some runs read, `engine.records_read`); default all. dtype: cache dtype word
    (default: the teacher's precision; fp32 for exactness). Several processes (accelerate) build disjoint shards;
    the main one writes the manifest. Returns the manifest's path.
    """
    output = Path(output)
    dtype_word = dtype or cfg.teacher_precision
    if dtype_word not in CACHE_DTYPES:
        raise ConfigError(f"teacher cache dtype: expected one of {', '.join(CACHE_DTYPES)}, got {dtype_word!r}")
    acc = accelerator or Accelerator(cpu=not torch.accelerator.is_available())
    loaded, report = load_records_with_report(cfg.train_data, limit=cfg.max_train_examples)
    if not loaded:
        raise DataError(f"{cfg.train_data}: no usable training records ({report.summary()})")
    subset = None if records is None else sorted(set(records))
    if subset is not None and (not subset or subset[0] < 0 or subset[-1] >= len(loaded)):
        raise ConfigError(f"teacher cache: record indices must lie in 0..{len(loaded) - 1}, got {len(subset)} "
                          f"from {subset[:1]} to {subset[-1:]}")
    teacher, teacher_tokenizer = load_frozen_teacher(cfg)
    student, student_tokenizer = load_model(
        cfg.student, tokenizer=cfg.student_tokenizer, arch=cfg.student_arch, dtype="fp32", seed=cfg.seed,
        trust_remote_code=cfg.trust_remote_code, allow_download=cfg.allow_download, layers=cfg.student_layers,
    )
    configs = serves or [dataclasses.replace(cfg, method=name) for name in methods or [cfg.method]]
    needs = methods_needs(configs, student, teacher, student_tokenizer, teacher_tokenizer)
    del student
    teacher.to(acc.device)
    kept = loaded if subset is None else [loaded[i] for i in subset]
    dataset = PairedDataset(kept, student_tokenizer, teacher_tokenizer, cfg.max_length, cfg.max_prompt_length)
    collator = PairedCollator.for_tokenizers(student_tokenizer, teacher_tokenizer)
    num_layers = teacher.config.get_text_config().num_hidden_layers
    first_side = collator([dataset[0]]).teacher.to(acc.device)
    layout = Layout.for_needs(needs, num_layers, logits_from_head=logits_from_head(teacher, first_side))
    settings = json.loads(json.dumps({  # as build.json holds them (tuples as lists), so a resume compares equal
        **cache_settings(cfg, student_tokenizer, teacher_tokenizer),
        "format": FORMAT_VERSION, "dtype": dtype_word, "layout": dataclasses.asdict(layout),
        "records": len(dataset), "records_per_shard": records_per_shard,
        # A cache of some records only (a comparison's runs): which ones, so a resume with others is refused.
        **({} if subset is None else {"record_subset": hashlib.sha256(json.dumps(subset).encode()).hexdigest()}),
    }))
    if acc.is_main_process:
        _start_build(output, settings, overwrite)
    acc.wait_for_everyone()
    shards = range(acc.process_index, -(-len(dataset) // records_per_shard), acc.num_processes)
    todo = [s for s in shards if not (output / _shard_name(s)).is_file()]
    def records_of(shard: int) -> range:  # each shard covers a fixed slice of the records
        return range(shard * records_per_shard, min(len(dataset), (shard + 1) * records_per_shard))

    bar = tqdm(total=sum(len(records_of(s)) for s in todo), desc="teacher cache", unit="rec", file=sys.stderr,
               disable=not (cfg.progress and acc.is_main_process), dynamic_ncols=True)
    written = 0
    for shard in todo:
        indices = records_of(shard)
        sides = (collator([dataset[i] for i in range(start, min(start + cfg.batch_size, indices.stop))]).teacher
                 for start in range(indices.start, indices.stop, cfg.batch_size))
        written += write_shard(teacher, (side.to(acc.device) for side in sides), layout, dtype_word,
                               output / _shard_name(shard), bar)
        bar.set_postfix(written=f"{written / 2**20:.1f}MiB")
    bar.close()
    acc.wait_for_everyone()
    if acc.is_main_process:
        finish_cache(output, settings, teacher)
    acc.wait_for_everyone()
    return output / MANIFEST_NAME


def write_shard(teacher, sides, layout: Layout, dtype: str, path: Path, bar=None) -> int:
    """Capture the teacher on each collated teacher side of `sides` and write its records to the shard `path`
    (atomically); returns the shard's bytes."""

    tensors, index = {}, {}
    for side in sides:
        with torch.no_grad():
            view = capture(teacher, side.input_ids, side.attention_mask, hidden_layers=layout.hidden,
                           attention_layers=layout.attention, logits=layout.logits == "stored")
        for row in range(side.input_ids.shape[0]):
            key, record, first = _record_tensors(view, side, row, layout, CACHE_DTYPES[dtype])
            tensors.update({name: t.cpu() for name, t in record.items()})
            index[key] = [first, int(side.attention_mask[row].sum())]
        if bar is not None:
            bar.update(side.input_ids.shape[0])
    _save_atomically(tensors, path, {"index": json.dumps(index)})
    return path.stat().st_size


def finish_cache(output: Path, settings: dict[str, Any], teacher) -> Path:
    """The teacher's head, then the manifest over every shard: a finished cache."""
    _save_head(teacher, output)
    return _write_manifest(output, settings, teacher)


def logits_from_head(teacher, side: SideBatch) -> bool:
    """Whether the teacher's logits are its head's output as it is (then the cache recomputes them from the head)."""

    with torch.no_grad():
        return capture(teacher, side.input_ids, side.attention_mask, hidden_layers=(-1,)).logits_from_head


def _save_head(teacher, output: Path) -> None:
    head, embeddings = teacher.get_output_embeddings(), teacher.get_input_embeddings()
    tensors = {"lm_head.weight": head.weight.detach().cpu().contiguous()}
    if head.bias is not None:
        tensors["lm_head.bias"] = head.bias.detach().cpu().contiguous()
    if embeddings.weight is not head.weight:  # tied: stored once
        tensors["embed_tokens.weight"] = embeddings.weight.detach().cpu().contiguous()
    _save_atomically(tensors, output / HEAD_NAME, {})


def _write_manifest(output: Path, settings: dict[str, Any], teacher) -> Path:
    """manifest.json, last: the settings, the teacher's config, the record index and every file's size and sha256."""
    files, index = {}, {}
    for path in sorted(output.glob("*.safetensors")):
        files[path.name] = {"size": path.stat().st_size, "sha256": _sha256_file(path)}
        if path.name.startswith("shard-"):
            with safe_open(path, framework="pt") as handle:
                for key, (first, length) in json.loads(handle.metadata()["index"]).items():
                    index[key] = [path.name, first, length]
    manifest = {"settings": settings, "teacher_config": teacher.config.to_dict(), "files": files, "index": index}
    tmp = output / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, default=str))
    os.replace(tmp, output / MANIFEST_NAME)
    return output / MANIFEST_NAME


# ------------------------------------------------------------------------------------------------ read
class TeacherCache:
    """A finished, verified cache: `view(side, needs)` gives a batch's teacher `ModelView`; `head` is the teacher's
    LM head (and embeddings) for the methods' set-up."""

    def __init__(self, folder: str | Path):
        """A finished cache read as it is (`open` checks it against a run first)."""
        from transformers import AutoConfig

        self.folder = folder = Path(folder)
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        settings = manifest["settings"]
        self.layout = Layout(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings["layout"].items()})
        self.dtype = CACHE_DTYPES[settings["dtype"]]
        self.index = manifest["index"]
        teacher_config = dict(manifest["teacher_config"])
        config = AutoConfig.for_model(teacher_config.pop("model_type"), **teacher_config)
        self.head = TeacherHead(load_file(folder / HEAD_NAME), config)
        self._shards: dict[str, Any] = {}

    @classmethod
    def open(cls, folder: str | Path, cfg: Config, student_tokenizer, teacher_tokenizer) -> TeacherCache:
        """Open `folder` for a run of `cfg`: refused (TeacherCacheError) when unfinished, built with other settings
        or damaged (a file whose size or sha256 differs from the manifest)."""
        return cls._verified(folder, cache_settings(cfg, student_tokenizer, teacher_tokenizer))

    @classmethod
    def open_for_pairs(cls, folder: str | Path, student_tokenizer, teacher_tokenizer, max_length: int,
                       max_prompt_length: int) -> TeacherCache:
        """Open `folder` for records paired with these tokenizers and lengths, whatever their source (the HF
        `DistillTrainer` reads a user's dataset, not a config's `train_data`): the settings that shape a record's
        pairing are checked now, and each record when a batch reads it (one the cache lacks is refused by name
        then). The teacher is the one the cache was built from."""
        return cls._verified(folder, dict(
            teacher_tokenizer=tokenizer_fingerprint(teacher_tokenizer),
            student_tokenizer=tokenizer_fingerprint(student_tokenizer),
            max_length=max_length, max_prompt_length=max_prompt_length))

    @classmethod
    def _verified(cls, folder: Path, wanted: dict[str, Any]) -> TeacherCache:
        """The cache at `folder` when finished, built with the settings `wanted` and intact."""
        folder = Path(folder)
        manifest_path = folder / MANIFEST_NAME
        if not manifest_path.is_file():
            raise TeacherCacheError(f"teacher_cache {folder}: no {MANIFEST_NAME}, so not a finished teacher cache "
                                    f"(run `sra teacher-cache` again with the same settings to finish it)")
        manifest = json.loads(manifest_path.read_text())
        built = {key: manifest["settings"].get(key) for key in wanted}
        if built != wanted:
            raise TeacherCacheError(f"teacher_cache {folder} was built with other settings: "
                                    f"{describe_differences(built, wanted)}")
        for name, expected in manifest["files"].items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != expected["size"] or _sha256_file(path) != expected["sha256"]:
                raise TeacherCacheError(f"teacher_cache {folder}: {name} is missing or damaged (its size or sha256 "
                                        f"differs from {MANIFEST_NAME}); rebuild the cache")
        return cls(folder)

    def check_needs(self, method: str, needs: Needs) -> None:
        if missing := self.layout.covers(needs):
            raise TeacherCacheError(f"teacher_cache {self.folder} does not hold what method {method!r} reads: "
                                    f"{'; '.join(missing)} (build it with --methods {method})")

    def _shard(self, name: str):
        if name not in self._shards:  # memory-mapped; kept open for the run
            self._shards[name] = safe_open(self.folder / name, framework="pt")
        return self._shards[name]

    def view(self, side: SideBatch, needs: Needs) -> ModelView:
        """The teacher's `ModelView` of a collated batch side, as `capture` would return it for `needs`: states and
        logits at the stored positions (zero on the prompt rows no method reads and on padding), attention rows."""
        layout, device = self.layout, side.input_ids.device
        canonical = lambda layers: sorted({layout.num_layers if x == -1 else x for x in layers})
        hidden_keys = canonical(needs.teacher_hidden_layers)
        read_hidden = set(hidden_keys) | ({layout.num_layers} if needs.teacher_logits and layout.logits == "head"
                                          else set())
        batch, length = side.input_ids.shape
        width = self.head.lm_head.weight.shape[1]
        hidden = {k: torch.zeros(batch, length, width, dtype=self.dtype) for k in read_hidden}
        rows = {k: torch.zeros(batch, length) for k in canonical(needs.teacher_attention_layers)}
        stored_logits = (torch.zeros(batch, length, self.head.lm_head.weight.shape[0], dtype=self.dtype)
                         if needs.teacher_logits and layout.logits == "stored" else None)
        stored = torch.zeros(batch, length, dtype=torch.bool)  # the positions the cache holds states for
        for b in range(batch):
            positions = side.attention_mask[b].nonzero().squeeze(-1).cpu()
            key = record_key(side.input_ids[b, positions])
            if key not in self.index:
                raise TeacherCacheError(f"teacher_cache {self.folder}: a batch record is not in the cache (its "
                                        f"teacher token ids differ from every cached record's): a cache holds the "
                                        f"records it was built from; build one over this data with `sra "
                                        f"teacher-cache`")
            shard_name, first, _ = self.index[key]
            shard = self._shard(shard_name)
            stored[b, positions[first:]] = True
            for layer, table in hidden.items():
                table[b, positions[first:]] = shard.get_tensor(f"{key}.h{layer}")
            for layer, table in rows.items():
                table[b, positions] = shard.get_tensor(f"{key}.a{layer}")
            if stored_logits is not None:
                stored_logits[b, positions[first:]] = shard.get_tensor(f"{key}.logits")
        hidden = {k: v.to(device) for k, v in hidden.items()}
        head = self.head.lm_head
        logits = None
        if stored_logits is not None:
            logits = stored_logits.to(device)
        elif needs.teacher_logits:
            # The head as the model applies it (the states in the head's dtype), on the stored rows only: the
            # prompt rows no method reads would cost as much again.
            stored = stored.to(device)
            logits = torch.zeros(batch, length, head.weight.shape[0], dtype=head.weight.dtype, device=device)
            logits[stored] = nn.functional.linear(
                hidden[layout.num_layers][stored].to(head.weight.dtype), head.weight, head.bias)
        return ModelView(
            hidden={k: hidden[k] for k in hidden_keys},
            attention_row={k: v.to(device) for k, v in rows.items()},
            logits=logits, lm_head_weight=head.weight, lm_head_bias=head.bias, num_layers=layout.num_layers,
            input_embedding_weight=self.head.embed_tokens.weight, logits_from_head=stored_logits is None,
        )

    def to(self, device: torch.device) -> TeacherCache:
        self.head.to(device)
        return self


# ------------------------------------------------------------------------------------------------ CLI
def run_teacher_cache(args) -> int:
    """`sra teacher-cache` (its options: `cli.add_teacher_cache_arguments`)."""
    cfg = load_config(resolve_config(args.config) if args.config else None, args.overrides)
    validate_settings(cfg)  # as `sra distill` does: bad settings, data or models are named before anything loads
    if args.records_per_shard < 1:
        raise ConfigError(f"--records-per-shard must be >= 1, got {args.records_per_shard}")
    methods = args.methods.split(",") if args.methods else None
    started = time.perf_counter()
    manifest_path = build_teacher_cache(cfg, args.output, methods=methods, dtype=args.dtype,
                                        records_per_shard=args.records_per_shard, overwrite=args.overwrite)
    manifest = json.loads(manifest_path.read_text())
    size = sum(f["size"] for f in manifest["files"].values())
    print(f"teacher cache: {len(manifest['index'])} records, {size / 2**20:.1f} MiB in {args.output}, "
          f"{time.perf_counter() - started:.0f} s; train with teacher_cache={args.output}")
    return 0
