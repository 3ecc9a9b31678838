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
    return [k for k, v in namespace.items()
            if not k.startswith('_') and not k.isupper() and isinstance(v, CONFIG_TYPES)]  # not imported CONSTANTS


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


def config_docs(script: str, keys) -> list[tuple[str, str, str]]:
    """(group, key, meaning) for every config key of `script`, in source order: the meaning is the comment on the
    line that assigns the key, the group the last full-line comment above it."""
    import io
    import re
    import tokenize

    source = open(script).read()
    comments = {}  # line number -> (comment text, whether the whole line is the comment)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip('#').strip(), tok.line.lstrip().startswith('#'))
    docs, group, above = [], 'general', None  # above: a full-line comment on the line just before
    lines = source.splitlines()
    for n, line in enumerate(lines, 1):
        text, full_line = comments.get(n, ('', False))
        m = re.match(r'([A-Za-z_]\w*)\s*(?::[^=]*)?=', line)
        if m and m.group(1) in keys and not any(k == m.group(1) for _, k, _ in docs):
            meaning = text if text and not full_line else ''
            if not meaning and above:  # the comment above a key with none of its own is its meaning, not a heading
                meaning, group = above, docs[-1][0] if docs else group
            docs.append((group, m.group(1), meaning))
        if full_line and line.startswith('#'):
            heading = text.strip('- ')
            if heading and heading != 'config':
                group = heading
            above = heading
        else:
            above = None
    return docs


def source_defaults(script: str, namespace: dict, keys) -> dict:
    """key -> its default as the script's source assigns it (evaluated in the script's namespace, for the names a
    default may use), not the value a configure() call may since have put in the namespace."""
    import ast

    source = open(script).read()
    defaults = {}
    for node in ast.parse(source).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id in keys and node.value is not None:
            defaults.setdefault(target.id, eval(ast.get_source_segment(source, node.value), dict(namespace)))
    return defaults


def describe(script: str, namespace: dict, keys) -> str:
    """`--help` text for a script's config: every key with its source default and its one line of meaning."""
    defaults = source_defaults(script, namespace, keys)
    out, group = [], None
    for g, key, meaning in config_docs(script, keys):
        if g != group:
            out.append(f'  {g}:' if g else '')
            group = g
        out.append(f'    --{key}={defaults[key]!r}')
        out.append(f'        {meaning}')
    return '\n'.join(out)
