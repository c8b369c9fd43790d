"""The altgrad package: its public names resolve, and its modules run as scripts without warnings."""

import subprocess
import sys

import pytest

import altgrad


def test_every_public_name_resolves():
    for name in altgrad.__all__:
        assert getattr(altgrad, name) is not None, name
    assert set(dir(altgrad)) >= set(altgrad.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        altgrad.nope


def test_python_m_altgrad_formats_prints_the_registry_without_a_runpy_warning():
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "altgrad.formats"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "E4M3" in proc.stdout and "E5M2" in proc.stdout
