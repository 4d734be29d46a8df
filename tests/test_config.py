"""The prune_* settings: defaults, validation, and errors that name the key, the file and the line."""
import math

import pytest

from prune_plugin.config import PruneConfig, PruneConfigError, load_yaml_config, yaml_key_lines


def write(tmp_path, text: str):
    path = tmp_path / "rome.yaml"
    path.write_text(text)
    return path


def test_defaults_leave_everything_off():
    config = PruneConfig.from_mapping({"alg_name": "ROME", "layers": [5]})
    assert not config.active and config.prune_mode == "final" and config.prune_alpha == math.e


def test_keys_from_an_easyedit_yaml_switch_prune_on(tmp_path):
    path = write(tmp_path, "alg_name: ROME\nlayers: [5]\nprune: true\nprune_alpha: 1.2\nprune_mode: online\n")
    config = load_yaml_config(path)
    assert config.prune and config.prune_alpha == 1.2 and config.prune_mode == "online" and config.active


def test_non_prune_keys_are_ignored():
    assert PruneConfig.from_mapping({"v_lr": 0.5, "pruned_layers": 3}).to_dict()["prune"] is False


@pytest.mark.parametrize("line,needle", [
    ("prune_alpha: 1", "prune_alpha: must be a log base > 1"),
    ("prune_alpha: 0.5", "prune_alpha: must be a log base > 1"),
    ("prune_mode: sometimes", "prune_mode: must be one of final, online"),
    ("prune: yes please", "prune: must be true or false"),
    ("prune_guard: explode", "prune_guard: must be one of off, warn, stop, rollback"),
    ("prune_guard_factor: 0.9", "prune_guard_factor: must be a number > 1"),
])
def test_bad_values_name_the_key_the_file_and_the_line(tmp_path, line, needle):
    path = write(tmp_path, f"alg_name: ROME\nlayers: [5]\n{line}\n")
    with pytest.raises(PruneConfigError) as err:
        load_yaml_config(path)
    assert f"{path}:3: {needle}" in str(err.value)


def test_a_misspelled_key_is_an_error_with_a_suggestion(tmp_path):
    path = write(tmp_path, "alg_name: ROME\nprune: true\nprune_alpah: 2\n")
    with pytest.raises(PruneConfigError, match=r"rome.yaml:3: unknown key 'prune_alpah' \(did you mean 'prune_alpha'\?\)"):
        load_yaml_config(path)


def test_yaml_off_is_read_as_the_guard_switched_off(tmp_path):
    assert load_yaml_config(write(tmp_path, "prune_guard: off\n")).prune_guard == "off"


def test_third_party_keys_are_accepted_when_a_plugin_declares_them():
    config = PruneConfig.from_mapping({"prune_my_knob": 3}, extra_keys={"prune_my_knob": 1})
    assert config.extra == {"prune_my_knob": 3} and config.active


def test_key_lines_are_one_based_and_missing_files_have_none(tmp_path):
    path = write(tmp_path, "# comment\nalg_name: ROME\nprune: true\n")
    assert yaml_key_lines(path) == {"alg_name": 2, "prune": 3}
    assert yaml_key_lines(tmp_path / "absent.yaml") == {}


def test_invalid_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "prune: [unclosed\n")
    with pytest.raises(PruneConfigError, match="rome.yaml: not valid YAML"):
        load_yaml_config(path)


@pytest.mark.parametrize("value", [None, "", "1", "0", "true", "False", " off ", "NO", "yes", "On", "maybe"])
def test_environment_switches_read_alike_in_the_package_and_the_start_up_hook(monkeypatch, value):
    """prune_plugin.switches is the package's one on/off parser; the start-up hook, which may not import the
    package, keeps the same words, and reads every value as the package does."""
    import _prune_plugin_autoload as autoload

    from prune_plugin.switches import env_switch

    if value is None:
        monkeypatch.delenv(autoload.ENV_SWITCH, raising=False)
    else:
        monkeypatch.setenv(autoload.ENV_SWITCH, value)
    assert autoload.enabled() == env_switch(autoload.ENV_SWITCH, default=True)


def test_an_environment_switch_is_its_default_unless_it_says_on_or_off(monkeypatch):
    from prune_plugin.switches import env_switch

    monkeypatch.delenv("PRUNE_TEST_SWITCH", raising=False)
    assert env_switch("PRUNE_TEST_SWITCH", default=True) and not env_switch("PRUNE_TEST_SWITCH", default=False)
    for value, expected in (("0", False), ("off", False), ("1", True), ("YES", True), ("maybe", True)):
        monkeypatch.setenv("PRUNE_TEST_SWITCH", value)
        assert env_switch("PRUNE_TEST_SWITCH", default=True) is expected
