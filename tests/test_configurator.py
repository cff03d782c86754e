"""configurator.py: config files and --key=value over plain defaults, with one-line errors."""
import pytest

from configurator import ConfigError, configure

DEFAULTS = {"out_dir": "out", "max_iters": 100, "learning_rate": 3e-4, "compile": False,
            "mixture": [("R", 3, 0.15, 1)], "betas": (0.9, 0.95), "overrides": {}}


def test_defaults_untouched_without_arguments():
    c = configure(DEFAULTS, [])
    assert c == DEFAULTS and c is not DEFAULTS


def test_command_line_values_are_parsed_as_python_literals():
    c = configure(DEFAULTS, ["--max_iters=7", "--learning_rate=1e-3", "--compile=True", "--out_dir=runs/a",
                             "--mixture=[('S', None, 0.75, 1)]", "--overrides={'hidden_size': 8}"])
    assert c["max_iters"] == 7 and c["learning_rate"] == 1e-3 and c["compile"] is True
    assert c["out_dir"] == "runs/a" and c["mixture"] == [("S", None, 0.75, 1)]
    assert c["overrides"] == {"hidden_size": 8}


def test_int_for_float_and_list_for_tuple_are_converted():
    c = configure(DEFAULTS, ["--learning_rate=1", "--betas=[0.8, 0.9]"])
    assert c["learning_rate"] == 1.0 and isinstance(c["learning_rate"], float)
    assert c["betas"] == (0.8, 0.9)


def test_string_keys_keep_text_that_looks_like_a_number():
    assert configure(DEFAULTS, ["--out_dir=123"])["out_dir"] == "123"


def test_config_file_is_executed_over_defaults_then_overridden(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text("import math\n_helper = 3\nmax_iters = 10 * _helper\nlearning_rate = max_iters * 1e-5\n")
    c = configure(DEFAULTS, [str(f), "--max_iters=5"])
    assert c["max_iters"] == 5 and c["learning_rate"] == pytest.approx(3e-4)


def test_config_file_can_exec_a_sibling_by_its_own_path(tmp_path):
    (tmp_path / "base.py").write_text("max_iters = 11\n")
    (tmp_path / "child.py").write_text(
        "import os\nexec(open(os.path.join(os.path.dirname(__file__), 'base.py')).read())\nout_dir = 'x'\n")
    c = configure(DEFAULTS, [str(tmp_path / "child.py")])
    assert c["max_iters"] == 11 and c["out_dir"] == "x"


@pytest.mark.parametrize("argv, words", [
    (["--max_itres=5"], ["max_itres", "valid keys", "max_iters", "learning_rate"]),
    (["--max_iters=5.5"], ["max_iters", "int", "float"]),
    (["--compile=1"], ["compile", "bool"]),
    (["--max_iters=abc"], ["max_iters", "int", "str"]),
    (["--max_iters"], ["--max_iters=VALUE"]),
    (["no_such_config.py"], ["no_such_config.py", "not found"]),
])
def test_bad_arguments_give_one_line_naming_the_key(argv, words):
    with pytest.raises(ConfigError) as e:
        configure(DEFAULTS, argv)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_unknown_key_in_config_file_names_file_and_key(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text("learning_rat = 1e-3\n")
    with pytest.raises(ConfigError, match=r"cfg\.py.*'learning_rat'.*valid keys"):
        configure(DEFAULTS, [str(f)])


def test_broken_config_file_names_file(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text("max_iters = = 3\n")
    with pytest.raises(ConfigError, match=r"cfg\.py failed: SyntaxError"):
        configure(DEFAULTS, [str(f)])
