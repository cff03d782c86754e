"""Config overrides, nanoGPT style: defaults are plain globals in train.py; a config file
named on the command line is exec'd over them, then `--key=value` arguments override both.

    python train.py config/tiny_shakespeare.py --max_iters=100 --device=cpu

Values are parsed with `ast.literal_eval` (a value that does not parse is taken as a
string) and must have the type of the default. An int is accepted where a float is
expected, a list where a tuple is (and the reverse). Anything else stops the run with
`ConfigError`, a one-line message naming the key.
"""
import ast
import os
import types


class ConfigError(ValueError):
    pass


def _check(key, value, defaults, source):
    if key not in defaults:
        valid = ", ".join(sorted(defaults))
        raise ConfigError(f"{source}: unknown config key '{key}'; valid keys: {valid}")
    default = defaults[key]
    if isinstance(default, bool) or isinstance(value, bool):
        ok = type(value) is type(default)  # bool is an int subclass: demand an exact match
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        value = type(default)(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{source}: config key '{key}' wants {type(default).__name__} "
                          f"(default {default!r}), got {type(value).__name__} {value!r}")
    return value


def _run_config_file(path, defaults):
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found; give a path such as config/tiny_shakespeare.py")
    scope = dict(defaults, __file__=path)  # so a config can exec a sibling config by path
    try:
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), scope)
    except Exception as e:  # a broken config file is the user's to fix: say where and what
        raise ConfigError(f"config file {path} failed: {type(e).__name__}: {e}") from None
    out = {}
    for key, value in scope.items():
        # imports and helper names (a leading underscore) may live in a config file
        if key.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue
        if key in defaults and value is defaults[key]:
            continue
        out[key] = _check(key, value, defaults, path)
    return out


def configure(defaults, argv):
    """Return a new dict: `defaults` updated by the config files and --key=value in argv."""
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            config.update(_run_config_file(arg, defaults))
            continue
        key, eq, text = arg[2:].partition("=")
        if not eq:
            raise ConfigError(f"argument '{arg}' should look like --{key}=VALUE")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word such as --device=cpu
        if isinstance(defaults.get(key), str) and not isinstance(value, str):
            value = text  # --out_dir=123 means the string "123"
        config[key] = _check(key, value, defaults, "command line")
    return config
