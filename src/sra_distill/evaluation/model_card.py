"""Hub-ready model folders: a model card, a generation config that stops at the right EOS, and a LoRA adapter.

`write_hub_files` runs on every `final/` and `best/` the engine writes (and `sra report` refreshes the cards, then
with the evaluation tables of `sra evaluate --output RUN/eval...`):

* `README.md`: the Hub's YAML metadata (`base_model` of the student when it is a hub model, the teacher as
  `teacher_model`, `datasets` when the training data is a hub dataset, `library_name`, `pipeline_tag`, `tags`),
  then the method, the settings that matter, a summary of `metrics.jsonl`, and the evaluation tables if any.
* `generation_config.json`: `eos_token_id` = the EOS the training appended to every response (the student
  tokenizer's), plus the model's own end-of-turn ids that are special tokens of that tokenizer; `pad_token_id`
  and `bos_token_id` from the tokenizer. `generate` then stops where the student learned to stop.
* `adapter/` (LoRA students whose base is a real model): the adapter alone, with `base_model_name_or_path` set to
  the base the run loaded (a hub id, or an absolute local path), so `PeftModel.from_pretrained` rebuilds it.

Upload a folder as it is with the Hub's own CLI: `hf upload <user>/<repo> runs/demo/final`.
"""

from __future__ import annotations

import re
from pathlib import Path

from sra_distill.config import Config, config_to_dict, load_config, method_sections
from sra_distill.errors import ModelSourceError
from sra_distill.evaluation.page import Block, evaluation_blocks, to_markdown, training_summary
from sra_distill.models.sources import resolve_model_source
from sra_distill.models.student import student_folder
from sra_distill.paths import resolve_data_path
from sra_distill.run_files import read_metric_rows

# Packaged models (models.sources.PACKAGED_MODELS) -> the hub model they are a GGUF conversion of.
PACKAGED_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

METHOD_SUMMARIES = {
    "sra": "SRA (Span Representation Alignment, arXiv 2605.01205): the response is cut into spans on which both "
           "tokenizations agree; each span is pooled into an attention-weighted centre of mass, and the student "
           "learns a projected cosine alignment to the teacher's span vectors, the teacher's span-to-span cosine "
           "geometry, and a KL on span logits over the shared vocabulary",
    "sft": "supervised fine-tuning on the responses (no teacher signal)",
    "uld": "ULD: a Wasserstein-style distance between the sorted token distributions of teacher and student",
    "mined": "MinED: token logits matched through a minimum-edit-distance vocabulary map",
    "dskd": "DSKD: dual-space distillation with cross-model attention between the two token sequences",
    "multilevel_ot": "MultiLevelOT: optimal transport between the two models' token-level distributions",
}


def hub_model_id(source: str | None) -> str | None:
    """The hub id a `teacher`/`student` setting stands for (packaged names map to their origin), or None for a
    random init or a local file/folder, which the Hub's metadata cannot point at."""
    if not source or source.startswith("random:"):
        return None
    if source.startswith("from:"):  # a student re-tokenised from a model: its body is that model's
        source = source[len("from:"):]
    if source in PACKAGED_HUB_IDS:
        return PACKAGED_HUB_IDS[source]
    if Path(source).expanduser().exists() or not _HUB_ID.match(source):
        return None
    return source


def hub_dataset_id(source: str | None) -> str | None:
    """The training data's hub dataset id, or None for a local file (resolved against the data root)."""
    if not source or resolve_data_path(source).exists() or not _HUB_ID.match(source):
        return None
    return source


def real_base_location(source: str, tokenizer: str | None = None, layers=None) -> str | None:
    """Where a LoRA adapter's base can be loaded from: the hub id, or the absolute path of the local model folder
    (packaged and GGUF models: their converted copy; `from:` students: their cached build); None for a random init."""
    if source.startswith("random:"):
        return None
    if source.startswith("from:") and tokenizer:
        return str(student_folder(source[len("from:"):], tokenizer, layers, quiet=True).resolve())
    location = resolve_model_source(source)
    path = Path(location).expanduser()
    return str(path.resolve()) if path.exists() else location


# ---------------------------------------------------------------------------------------------- generation config
def generation_config_for(model, tokenizer):
    """The model's generation config with the special ids the training used (see the module docstring)."""
    from transformers import GenerationConfig

    base = model.generation_config  # transformers sets it on every model; None for one that cannot generate
    config = GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelSourceError("the student tokenizer has no EOS token; generation could not stop")
    previous = config.eos_token_id
    previous = [] if previous is None else [previous] if isinstance(previous, int) else list(previous)
    special = set(tokenizer.all_special_ids)
    config.eos_token_id = [eos, *[i for i in previous if i != eos and i in special]]
    if len(config.eos_token_id) == 1:
        config.eos_token_id = eos
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config.bos_token_id = tokenizer.bos_token_id
    config._from_model_config = False  # set on purpose: transformers must not re-derive it from config.json
    return config


# ------------------------------------------------------------------------------------------------------ model card
def _settings_rows(cfg: Config, world_size: int) -> list[list[str]]:
    rows = [
        ["teacher", f"`{cfg.teacher}`" + (f" (tokenizer `{cfg.teacher_tokenizer}`)" if cfg.teacher_tokenizer else "")],
        ["student", f"`{cfg.student}`" + (f" (tokenizer `{cfg.student_tokenizer}`)" if cfg.student_tokenizer else "")],
        ["method", f"`{cfg.method}`"],
        ["loss", f"{cfg.alpha} * CE + {1 - cfg.alpha:g} * distillation"],
    ]
    section = method_sections().get(cfg.method)
    knobs = config_to_dict(getattr(cfg.methods, section)) if section else {}
    if knobs:
        rows.append([f"methods.{section}", ", ".join(f"{k}={v}" for k, v in knobs.items())])
    rows += [
        ["training data", f"`{cfg.train_data}`" + (f" (first {cfg.max_train_examples})" if cfg.max_train_examples
                                                   else "")],
        ["max_length / max_prompt_length", f"{cfg.max_length} / {cfg.max_prompt_length}"],
        ["global batch", f"{cfg.batch_size} x {cfg.grad_accum} accumulation x {world_size} processes"],
        ["steps", str(cfg.max_steps) if cfg.max_steps else f"{cfg.epochs} epochs"],
        ["lr", f"{cfg.lr:g} (warm-up {cfg.warmup_steps}, cosine to {cfg.min_lr_ratio:g} of peak; the method's "
               f"projectors: its projector_lr)"],
        ["precision (student / teacher)", f"{cfg.precision} / {cfg.teacher_precision}"],
        ["seed", str(cfg.seed)],
    ]
    if cfg.lora.enabled:
        rows.append(["LoRA", f"r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout}, "
                             f"merged into the weights: {cfg.lora.merge_on_save}"])
    return rows


def model_card(cfg: Config, output_dir: Path, kind: str = "final", step: int | None = None,
               world_size: int = 1, has_adapter: bool = False, dev_rouge: float | None = None) -> str:
    """The README.md text of `output_dir/<kind>/` (kind: final or best; metrics rows after `step` are left out;
    dev_rouge: the dev ROUGE-L that made this the best checkpoint, when not yet in metrics.jsonl)."""
    from huggingface_hub import ModelCard, ModelCardData

    output_dir = Path(output_dir)
    base = hub_model_id(cfg.student)
    teacher = hub_model_id(cfg.teacher)
    dataset = hub_dataset_id(cfg.train_data)
    tags = ["sra-distill", "knowledge-distillation", "cross-tokenizer-distillation", cfg.method]
    if cfg.lora.enabled:
        tags.append("lora")
    data = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation", base_model=base,
        datasets=[dataset] if dataset else None, tags=tags, teacher_model=teacher or cfg.teacher,
    )
    name = cfg.run_name or output_dir.resolve().name
    what = "the checkpoint with the best dev ROUGE-L" if kind == "best" else "the final student"
    at = f" (step {step})" if step is not None else ""
    method = METHOD_SUMMARIES.get(cfg.method, f"`{cfg.method}`: a same-tokenizer divergence between token "
                                               "distributions")
    intro = (f"{what[0].upper() + what[1:]}{at} of the run `{name}`: `{cfg.student}` distilled from the teacher "
             f"`{cfg.teacher}` with sra-distill, method {method}.")
    if dev_rouge is not None:
        intro += f" Dev ROUGE-L at that step: {dev_rouge:.2f}."
    if base is None and cfg.student.startswith("random:"):
        intro += " The student was initialised at random (architecture in the settings below)."
    blocks = [Block("h1", f"{name} ({kind})"), Block("p", intro), Block("h2", "Use"),
              Block("p", "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                         "model = AutoModelForCausalLM.from_pretrained(\"<this folder or repo id>\")\n"
                         "tokenizer = AutoTokenizer.from_pretrained(\"<this folder or repo id>\")\n"
                         "inputs = tokenizer(\"### Instruction:\\nName three colours.\\n\\n### Response:\\n\", "
                         "return_tensors=\"pt\")\n"
                         "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))\n```\n\n"
                         "`generation_config.json` stops generation at the EOS the student was trained to emit.")]
    if has_adapter:
        blocks.append(Block("p", "`adapter/` holds the LoRA adapter alone (`PeftModel.from_pretrained(base, "
                                 "\"adapter\")`); its `base_model_name_or_path` names the base the run loaded."))
    blocks += [Block("h2", "Distillation settings"),
               Block("table", header=["setting", "value"], rows=_settings_rows(cfg, world_size))]
    metrics = output_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = read_metric_rows(metrics)
        if step is not None:
            rows = [r for r in rows if r["step"] <= step]
        if rows:
            blocks += [Block("h2", "Training"), Block("table", header=["", "value"], rows=training_summary(rows))]
    if any(output_dir.rglob("scores.json")):
        blocks += evaluation_blocks(output_dir)[0]
    body = to_markdown(blocks, output_dir)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def save_adapter(peft_model, target: Path, base_location: str) -> Path:
    """The LoRA adapter alone in `target`, its config pointing at `base_location`."""
    config = peft_model.peft_config[peft_model.active_adapter]
    previous = config.base_model_name_or_path
    config.base_model_name_or_path = base_location
    try:
        peft_model.save_pretrained(str(target), safe_serialization=True)
    finally:
        config.base_model_name_or_path = previous
    return target


def write_hub_files(target: Path, cfg: Config, *, model, peft_model=None, tokenizer, output_dir: Path,
                    kind: str = "final", step: int | None = None, world_size: int = 1,
                    dev_rouge: float | None = None) -> None:
    """generation_config.json, adapter/ (LoRA with a real base) and README.md into a saved model folder."""
    target = Path(target)
    generation_config_for(model, tokenizer).save_pretrained(str(target))
    has_adapter = False
    if peft_model is not None:
        base = real_base_location(cfg.student, cfg.student_tokenizer, cfg.student_layers)
        if base is not None:
            # merge_on_save=False: the folder is the adapter itself; otherwise it goes beside the merged weights.
            save_adapter(peft_model, target if not cfg.lora.merge_on_save else target / "adapter", base)
            has_adapter = cfg.lora.merge_on_save
    (target / "README.md").write_text(
        model_card(cfg, output_dir, kind, step, world_size, has_adapter, dev_rouge), encoding="utf-8")


def refresh_model_cards(output_dir: Path) -> list[Path]:
    """Rewrite the README.md of a run's final/ and best/ from its saved config, metrics and evaluations."""
    output_dir = Path(output_dir)
    config_path = output_dir / "config.yaml"
    if not config_path.is_file():
        return []
    cfg = load_config(config_path)
    metrics = output_dir / "metrics.jsonl"
    rows = read_metric_rows(metrics) if metrics.is_file() else []
    world = int(rows[-1].get("world_size", 1)) if rows else 1
    dev = [r for r in rows if "dev_rouge_l" in r]
    # The engine keeps a new best only when strictly better, so best/ is the earliest step with the top score.
    best_step = max(dev, key=lambda r: r["dev_rouge_l"])["step"] if dev else None
    written = []
    for kind, step in (("final", rows[-1]["step"] if rows else None), ("best", best_step)):
        folder = output_dir / kind
        if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
            continue
        has_adapter = (folder / "adapter" / "adapter_config.json").is_file()
        card = folder / "README.md"
        card.write_text(model_card(cfg, output_dir, kind, step, world, has_adapter), encoding="utf-8")
        written.append(card)
    return written
