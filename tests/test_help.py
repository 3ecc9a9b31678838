"""`--help` of the nanoGPT-style scripts (issue 26): exit 0, every stage and every config key with its default and
one line of meaning, generated from the source (configurator.describe), so a new key cannot go undocumented."""
import os
import subprocess
import sys

import pytest

import configurator
import s3
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module", [s3, train], ids=["s3", "train"])
def test_every_config_key_has_a_meaning(module):
    docs = configurator.config_docs(module.__file__, module.config_keys)
    assert [k for _, k, _ in docs] == list(module.config_keys)  # every key, in source order
    assert not [k for _, k, meaning in docs if not meaning], "config keys without a comment on their line"
    assert not any(k.isupper() for k in module.config_keys)  # imported constants are not config


@pytest.mark.parametrize("module", [s3, train], ids=["s3", "train"])
def test_help_lists_stages_keys_defaults(module, capsys):
    """The defaults shown are the source's, even after a configure() in this process changed the module's globals."""
    import runpy

    fresh = runpy.run_path(module.__file__)  # the script's globals as its source sets them (not __main__)
    module.configure(["--seed=123"])  # what a configured run leaves in the module's globals
    try:
        rc = module.main(["--help"])
    finally:
        module.configure([f"--seed={fresh['seed']}"])
    out = capsys.readouterr().out
    assert rc in (0, None)
    for _, key, meaning in configurator.config_docs(module.__file__, module.config_keys):
        assert f"--{key}={fresh[key]!r}\n        {meaning}\n" in out + "\n", key
    if module is s3:
        for stage in s3.STAGES:
            assert f"\n  {stage} " in out, stage


def test_s3_help_exit_status_and_usage_error():
    ok = subprocess.run([sys.executable, "s3.py", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert ok.returncode == 0 and ok.stdout.startswith("usage: python s3.py")
    bad = subprocess.run([sys.executable, "s3.py", "cook"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.startswith("usage:") and not bad.stdout
