"""PruneConfig(...) built directly (as session.py's docstring shows) gets the YAML path's checks and messages."""
import math

import pytest

from prune_plugin.config import PruneConfig, PruneConfigError, load_yaml_config


@pytest.mark.parametrize("key,value", [
    ("prune_alpha", "e-ish"),
    ("prune_alpha", 0.5),
    ("prune_alpha", 1),
    ("prune_alpha", float("nan")),
    ("prune_mode", "sometimes"),
    ("prune", "yes"),
    ("prune_never_enlarge", 1),
    ("prune_rank_rule", "numpy"),
    ("prune_originals_device", "gpu"),
    ("prune_targets", []),
    ("prune_telemetry", ""),
    ("prune_guard", "explode"),
    ("prune_guard_factor", 0.9),
    ("prune_guard_sentences", 0),
    ("prune_guard_batch_size", 2.5),
])
def test_a_bad_value_is_refused_with_the_same_message_as_from_yaml(tmp_path, key, value):
    with pytest.raises(PruneConfigError) as direct:
        PruneConfig(**{key: value})
    path = tmp_path / "rome.yaml"
    path.write_text(f"alg_name: ROME\n{key}: {value!r}\n" if isinstance(value, str) else
                    f"alg_name: ROME\n{key}: {'.nan' if value != value else value}\n")
    with pytest.raises(PruneConfigError) as from_yaml:
        load_yaml_config(path)
    assert str(direct.value).startswith(f"{key}: ")
    assert str(from_yaml.value) == f"{path}:2: {direct.value}"


def test_values_are_normalised_as_from_yaml():
    config = PruneConfig(prune=True, prune_mode="Final", prune_alpha="e", prune_guard=False, prune_rank_rule="OFFICIAL")
    assert config.prune_mode == "final" and config.prune_alpha == math.e
    assert config.prune_guard == "off" and config.prune_rank_rule == "official"
    assert PruneConfig(prune_alpha="linear").prune_alpha == "linear"


def test_defaults_are_valid_and_the_exact_rank_rule_is_the_default():
    config = PruneConfig()
    assert config.prune_rank_rule == "exact" and config.prune_alpha == math.e and not config.active


def test_a_config_read_from_yaml_keeps_its_values(tmp_path):
    path = tmp_path / "rome.yaml"
    path.write_text("prune: true\nprune_alpha: 1.2\nprune_rank_rule: official\nprune_guard: off\n")
    config = load_yaml_config(path)
    assert (config.prune, config.prune_alpha, config.prune_rank_rule, config.prune_guard) == (True, 1.2, "official", "off")
    assert config.source == str(path)
