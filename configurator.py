"""The one configurator of the nanoGPT-style scripts (train.py, s3.py).

A script's config is its typed module globals. `configure(argv, globals(), keys)` overrides them by config files
(plain Python assignments, run in order; names starting with `_` are the file's own helpers) and then by flags,
`--key=value` or `--key value` (a Python literal, else a bare string), wherever they stand on the command line:
a flag always wins over a file. Every value must have its default's type (an int is taken for a float, a list for
a tuple); an unknown key or a wrong type stops the script with one line naming the file or flag.
"""
import ast
import os
import types

CONFIG_TYPES = (int, float, bool, str, tuple, dict)


def config_keys(namespace: dict) -> list[str]:
    """The configurable names of a module: its public globals of a plain config type."""
    return [k for k, v in namespace.items() if not k.startswith('_') and isinstance(v, CONFIG_TYPES)]


def configure(argv, namespace: dict, keys, error=SystemExit):
    """Apply config files, then flags, from argv to `namespace` (a module's globals()); `error` is raised with a
    one-line message on bad input."""
    def put(key, value, where):
        if key not in keys:
            raise error(f'{where}: unknown config key {key!r}')
        old = namespace[key]
        if isinstance(old, float) and type(value) is int:
            value = float(value)
        if isinstance(old, tuple) and type(value) is list:
            value = tuple(value)
        if type(value) is not type(old):
            raise error(f'{where}: {key} must be {type(old).__name__}, got {value!r}')
        namespace[key] = value

    files, flags, args = [], [], list(argv)
    while args:  # config files first (in order), then the flags, wherever they stand
        arg = args.pop(0)
        if not arg.startswith('--'):
            files.append(arg)
            continue
        key, eq, raw = arg[2:].partition('=')
        if not eq:
            if not args:
                raise error(f'{arg}: expected --key=value or --key value')
            raw = args.pop(0)
        flags.append((key, raw, arg))
    for path in files:
        if not os.path.isfile(path):
            raise error(f'config file not found: {path}')
        scope = {}
        with open(path) as f:
            exec(f.read(), scope)
        for k, v in scope.items():
            if not k.startswith('_') and not isinstance(v, (types.ModuleType, types.FunctionType, type)):
                put(k, v, path)
    for key, raw, arg in flags:
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare string: --out_dir=runs/a
        put(key, value, arg)
