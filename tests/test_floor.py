"""The torch range: the floor is declared once (requirements.txt) and checked at start-up in one
error line; the shim for an API newer than the floor takes the older one. CI runs the scripts on
the exact floors too (.ci/run's floor tier)."""
import re
import subprocess
import sys

import pytest
import torch

import common
from conftest import ROOT


def test_the_floor_is_the_requirements_lower_bound():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    torch_line = next(line for line in lines if re.match(r"torch\s*>=", line))
    assert tuple(int(p) for p in torch_line.split(">=")[1].strip().split(".")) == common.TORCH_FLOOR
    assert not any("==" in line for line in lines if not line.startswith("#"))  # lower bounds only


@pytest.mark.parametrize("version", ["2.4.1", "2.4.1+cu121", "2.5.0", "2.10.0a0+git1234", "3.0.0"])
def test_versions_from_the_floor_on_pass(version):
    common.check_torch(version)


@pytest.mark.parametrize("version", ["2.4.0", "2.3.1+cu121", "2.1.2", "1.13.1"])
def test_an_older_torch_fails_in_one_line(version, capsys):
    with pytest.raises(SystemExit) as e:
        common.check_torch(version)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and version in err and ">=2.4" in err


def test_a_script_stops_at_start_up_under_an_older_torch(tmp_path):
    """As a user with an old torch sees it: the script's first output is the one line, even for --help."""
    code = "import runpy, sys, torch; torch.__version__ = '2.3.1'; sys.argv = ['cc.py', '--help']; runpy.run_path('cc.py', run_name='__main__')"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == "", p.stdout[-500:]
    assert p.stderr.splitlines() == [p.stderr.strip()] and p.stderr.startswith("error: torch 2.3.1 is installed") and ">=2.4" in p.stderr


def test_all_gather_takes_the_older_name_where_the_newer_is_missing(monkeypatch):
    """all_gather_single is torch 2.13's name for all_gather_into_tensor (which 2.13 on deprecates)."""
    called = []
    monkeypatch.setattr(torch.distributed, "all_gather_into_tensor", lambda out, x: called.append("into_tensor"), raising=False)
    monkeypatch.setattr(torch.distributed, "all_gather_single", lambda out, x: called.append("single"), raising=False)
    common.all_gather_rows(None, None)
    monkeypatch.delattr(torch.distributed, "all_gather_single")
    common.all_gather_rows(None, None)
    assert called == ["single", "into_tensor"]
