"""Settings checked in one place per concern (issues 28 and 29): each setting's range, names and resume safety are
declared with it and checked when its dataclass is built; rules across sections in validation.py; the method
contract is typed (`MethodConfig`)."""

import dataclasses
import math

import pytest

from sra_distill.config import METHOD_NAMES, Config, ConfigError, MethodSettings, load_config, method_settings
from sra_distill.fields import SettingError, resume_safe_keys, setting
from sra_distill.losses.base import MethodConfig
from sra_distill.losses.divergences import KINDS
from sra_distill.paths import CONFIGS_DIR
from sra_distill.settings_doc import settings
from sra_distill.train.runfolder import fingerprint, safe_changes
from sra_distill.validation import check_combinations, validate_settings

TINY = CONFIGS_DIR / "tiny.yaml"
ARCH_SIZES = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "max_positions")


def refusal(*overrides) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(TINY, list(overrides))
    return str(caught.value)


# --------------------------------------------------------------------------------------------- the method contract
def test_every_method_section_is_a_method_config_read_as_plain_attributes():
    sections = [getattr(MethodSettings(), f.name) for f in dataclasses.fields(MethodSettings)]
    assert all(isinstance(section, MethodConfig) for section in sections)
    served = [name for section in sections for name in section.method_names]
    assert tuple(served) == METHOD_NAMES and len(set(served)) == len(served)  # each name served by one section
    runs = {name: method_settings(Config(method=name)) for name in METHOD_NAMES}
    assert {name for name, c in runs.items() if not c.uses_teacher} == {"sft"}
    assert {name: c.projector_lr for name, c in runs.items() if c.projector_lr is not None} == {
        "sra": Config().methods.sra.projector_lr, "dskd": Config().methods.dskd.projector_lr}
    assert {name for name, c in runs.items() if type(c).method_names == KINDS} == set(KINDS)


def test_a_method_config_without_build_cannot_be_made():
    @dataclasses.dataclass
    class Incomplete(MethodConfig):
        method_names = ("incomplete",)

    with pytest.raises(TypeError, match="build"):
        Incomplete()


# ------------------------------------------------------------------------------------------- ranges, where declared
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", ".inf", ".nan"])
def test_every_float_setting_must_be_finite(value):
    floats = [s.key for s in settings() if "float" in s.type.split(" | ")]
    assert {"lr", "alpha", "methods.sra.projector_lr", "on_policy.top_p", "student_arch.dropout"} <= set(floats)
    for key in floats:
        assert refusal(f"{key}={value}").startswith(f"{key}: must be a finite number, got "), key


@pytest.mark.parametrize("side", ["teacher_arch", "student_arch"])
@pytest.mark.parametrize("value", [0, -32])
def test_every_architecture_size_must_be_positive(side, value):
    for name in ARCH_SIZES:
        assert refusal(f"{side}.{name}={value}") == f"{side}.{name}: must be >= 1, got {value}"
    assert refusal(f"{side}.dropout=1") == f"{side}.dropout: must be in [0, 1), got 1.0"


def test_heads_must_divide_the_width_and_kv_heads_the_heads():
    assert refusal("student_arch.hidden_size=30") == "student_arch.num_heads: must divide hidden_size=30, got 4"
    assert refusal("teacher_arch.num_kv_heads=3") == "teacher_arch.num_kv_heads: must divide num_heads=4, got 3"
    # A random Llama rotates pairs of each head's dimensions: 48 / 16 = 3 per head cannot be.
    with pytest.raises(ConfigError, match=r"^teacher_arch\.num_heads: random:llama needs an even head size"):
        check_combinations(load_config(TINY, ["teacher_arch.num_heads=16"]))
    check_combinations(load_config(TINY, ["student_arch.num_heads=32"]))  # GPT-2 takes any head size


def test_a_dataclass_built_in_code_is_checked_and_names_its_field():
    with pytest.raises(SettingError, match=r"^lr: must be > 0, got 0"):
        Config(lr=0)
    with pytest.raises(SettingError, match=r"^temperature: must be > 0, got 0"):
        type(Config().methods.mined)(temperature=0)
    with pytest.raises(SettingError, match=r"^top_k: must be >= 1, got 0"):
        type(Config().methods.multilevel_ot)(top_k=0)


def test_a_setting_changed_after_it_was_built_is_still_refused_before_anything_loads():
    cfg = load_config(TINY)
    cfg.lr = math.inf
    with pytest.raises(ConfigError, match=r"^lr: must be a finite number, got inf"):
        validate_settings(cfg)
    cfg = load_config(TINY)
    cfg.student_arch.hidden_size = 0
    with pytest.raises(ConfigError, match=r"^student_arch\.hidden_size: must be >= 1, got 0"):
        validate_settings(cfg)


def test_on_policy_needs_a_method_that_runs_the_teacher():
    with pytest.raises(ConfigError, match=r"^on_policy\.ratio=0\.5 with method=sft: .*needs a teacher"):
        check_combinations(load_config(TINY, ["method=sft", "on_policy.ratio=0.5"]))


# -------------------------------------------------------------------------------------------------- mistyped keys
def test_a_mistyped_key_names_the_nearest_known_one():
    assert refusal("on_polcy.ratio=0.5") == "unknown setting 'on_polcy.ratio'; did you mean 'on_policy.ratio'?"
    assert refusal("methods.sra.geo_wieght=1") == ("unknown setting 'methods.sra.geo_wieght'; "
                                                   "did you mean 'methods.sra.geo_weight'?")
    far = refusal("zzzz=1")  # nothing close: the known keys of that level
    assert far.startswith("unknown setting 'zzzz'; known: allow_download, alpha,") and "did you mean" not in far


# ------------------------------------------------------------------------------------------------- resume safety
def test_resume_safety_is_declared_with_each_setting():
    cfg = load_config(TINY)
    safe = resume_safe_keys(cfg)
    assert {"max_steps", "epochs", "output_dir", "report_to", "teacher_sharding", "resume"} <= safe
    assert not safe & {"lr", "seed", "batch_size", "method", "methods.sra.geo_weight", "student_arch.hidden_size"}
    assert not safe & set(fingerprint(cfg, 1)) and "lr" in fingerprint(cfg, 1)
    changed = load_config(TINY, ["max_steps=9", "keep_last=5", "lr=1", "resume=true"])
    assert [key for key, _, _ in safe_changes(dataclasses.asdict(cfg), changed)] == ["keep_last", "max_steps"]


def test_resume_safety_of_a_nested_section_is_keyed_by_its_dotted_name():
    @dataclasses.dataclass
    class Section:
        speed_only: bool = setting(True, resume_safe=True)
        weight: float = setting(1.0, ge=0)

    @dataclasses.dataclass
    class Outer:
        section: Section = dataclasses.field(default_factory=Section)
        steps: int = setting(3, resume_safe=True)

    assert resume_safe_keys(Outer()) == {"section.speed_only", "steps"}
