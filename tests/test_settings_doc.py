"""Settings you can discover: `sra distill --help` lists every setting (type, default, doc read from the source) and
`sra config` prints the resolved settings as YAML that loads back to the same config."""

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

from sra_distill import config as config_module
from sra_distill import settings_doc
from sra_distill.cli import main
from sra_distill.config import Config, config_to_dict, load_config
from sra_distill.losses.sra import SRAConfig
from sra_distill.settings_doc import docstring_fields, field_comments, format_default, notes, settings

TINY = Path(__file__).resolve().parents[1] / "src/sra_distill/configs/tiny.yaml"


def leaf_keys(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_every_setting_is_listed_once_with_a_doc():
    listed = [s.key for s in settings()]
    assert len(listed) == len(set(listed))
    assert listed == list(leaf_keys(config_to_dict(load_config())))  # every key a config file can hold, in order
    assert [s.key for s in settings() if not s.doc] == []


def test_docs_are_the_comments_in_the_source():
    source_lines = inspect.getsource(Config).splitlines()
    line = next(l for l in source_lines if l.strip().startswith("lr: float"))
    comments = field_comments(Config)
    assert comments["lr"] == (line.split("#", 1)[1].strip(), "optimisation")
    assert comments["report_to"][1] == "run" and comments["teacher"][1] == "models"
    # A comment block above a field documents it; the help keeps its first sentence.
    sra = {s.key: s for s in settings()}
    assert field_comments(SRAConfig)["layer_pairs"][0].startswith("Layer pairs aligned by L_cos")
    assert sra["methods.sra.layer_pairs"].doc.endswith("use the last pair.")
    assert sra["methods.sra.layer_pairs"].type == "list[tuple[int, ...]]"
    # Method configs documented as `name: doc` lines of their docstring.
    from sra_distill.losses.multilevel_ot import MultiLevelOTConfig

    assert docstring_fields(MultiLevelOTConfig)["log_weight"].startswith("weights of the three terms")


def test_field_comments_handle_blocks_sections_and_blank_lines():
    @dataclasses.dataclass
    class Example:
        # --- first part ---
        a: int = 1  # the a
        # about b,
        # over two lines
        b: str | None = None

        # an orphan comment

        c: bool = True
        d: list[int] = dataclasses.field(default_factory=lambda: [1, 2])  # the d

    comments = field_comments(Example)
    assert comments == {"a": ("the a", "first part"), "b": ("about b, over two lines", "first part"),
                        "c": ("", "first part"), "d": ("the d", "first part")}


def test_distill_help_shows_type_default_and_doc(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = capsys.readouterr().out
    for s in settings():
        assert f"  {s.key}: {s.type} = {format_default(s.default)}{notes(s)}\n      {s.doc}\n" in text + "\n", s.key
    assert "  lr: float = 5e-05  (> 0)\n      student peak learning rate" in text
    assert "  methods.sra.geo_weight: float = 50.0  (>= 0)\n" in text
    assert "  alpha: float = 0.5  (in [0, 1])\n" in text and "  on_policy.top_p: float = 1.0  (in (0, 1])\n" in text
    assert "  precision: str = no  (one of no, bf16, fp16)\n" in text
    assert "  max_steps: int | None = 24  (>= 1; may change on resume)\n" in text
    assert "  report_to: list[str] = []  (may change on resume)\n" in text


def test_sra_config_prints_yaml_that_loads_back(capsys, tmp_path):
    assert main(["config", "--config", str(TINY), "lr=3e-4", "methods.sra.geo_weight=10",
                 "report_to=[tensorboard]"]) == 0
    text = capsys.readouterr().out
    printed = yaml.safe_load(text)
    assert printed["lr"] == 3e-4 and printed["methods"]["sra"]["geo_weight"] == 10.0
    assert printed["teacher"] == "random:llama" and printed["report_to"] == ["tensorboard"]
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    expected = load_config(TINY, ["lr=3e-4", "methods.sra.geo_weight=10", "report_to=[tensorboard]"])
    assert load_config(path) == expected
    assert main(["config", "max_steps=soon"]) == 2
    assert "max_steps: expected an integer" in capsys.readouterr().err


def test_config_module_documents_every_field_in_one_place():
    # The docs are not repeated anywhere: the help is built from config.py alone (no second table of docs).
    assert "student peak learning rate" in Path(config_module.__file__).read_text()
    assert "student peak learning rate" not in Path(settings_doc.__file__).read_text()


def test_settings_moved_into_the_sra_section_still_load_with_a_warning(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("method: sra\nnormalize_vocab: false\nprojector_lr: 1.0e-3\nmethods:\n  sra: {geo_weight: 10.0}\n")
    with pytest.warns(FutureWarning, match=r"normalize_vocab is now methods\.sra\.normalize_vocab"):
        cfg = load_config(old)
    assert (cfg.methods.sra.normalize_vocab, cfg.methods.sra.projector_lr, cfg.methods.sra.geo_weight) == \
        (False, 1e-3, 10.0)
    with pytest.warns(FutureWarning, match=r"overrides: the setting projector_lr is now methods\.sra\.projector_lr"):
        assert load_config(TINY, ["projector_lr=2e-3"]).methods.sra.projector_lr == 2e-3
    # The new key given after the old one (an override on an old file) wins, as any override does.
    with pytest.warns(FutureWarning):
        assert load_config(old, ["methods.sra.projector_lr=3e-3"]).methods.sra.projector_lr == 3e-3
    with pytest.raises(config_module.ConfigError, match="both projector_lr .old name. and methods.sra.projector_lr"):
        load_config(TINY, ["projector_lr=2e-3", "methods.sra.projector_lr=3e-3"])


def test_every_config_file_in_the_repository_loads_without_old_names():
    import warnings

    root = Path(__file__).resolve().parents[1]
    found = [*(root / "configs").rglob("*.yaml"), *(root / "src/sra_distill/configs").glob("*.yaml")]
    paths = sorted(path for path in found
                   if "accelerate" not in path.parts)
    assert len(paths) >= 5  # the packaged configs at least
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for path in paths:
            load_config(path)


def test_a_retired_setting_still_loads_with_a_warning_saying_it_is_ignored(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("method: sra\nmethods:\n  sra: {keep_teacher_span_logits: true, geo_weight: 10.0}\n")
    with pytest.warns(FutureWarning, match=r"methods\.sra\.keep_teacher_span_logits no longer has an effect"):
        cfg = load_config(old)
    assert cfg.methods.sra.geo_weight == 10.0 and "keep_teacher_span_logits" not in config_module.config_to_dict(
        cfg)["methods"]["sra"]
    with pytest.warns(FutureWarning, match="no longer has an effect"):
        load_config(TINY, ["methods.sra.keep_teacher_span_logits=true"])


def test_the_packaged_help_lists_the_settings_of_this_code():
    # `sra distill --help` prints the file without importing the settings' dataclasses (they import torch).
    assert settings_doc.HELP_FILE.read_text(encoding="utf-8") == settings_doc.distill_help(), \
        "a setting changed: run `python -m sra_distill.settings_doc` to rewrite src/sra_distill/settings_help.txt"
