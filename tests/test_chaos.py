"""The chaos suite's short runs: break the mesh on purpose, then let the checker decide.

A planted bug (replies before commits) must be caught; the real code must pass, on one
host and on three namespaced hosts. Longer runs: scripts/chaos/run.py --minutes N.
"""

import os
import subprocess
import sys

import pytest

from procs import ROOT, env

sys.path.insert(0, str(ROOT / "scripts"))
import hosts as hosts_tool  # noqa: E402


def chaos(tmp_path, *args, timeout=240):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "chaos" / "run.py"), "--out", str(tmp_path / "run"),
                        *args], capture_output=True, text=True, env=env(), timeout=timeout, cwd=ROOT)
    report = (tmp_path / "run" / "report.txt")
    text = report.read_text() if report.exists() else r.stdout + r.stderr
    # the run's folder holds the mesh's logs, config and data: a failure message names it
    return r, f"{text}\n(the run's logs, config and data are in {tmp_path / 'run'})"


def test_the_checker_catches_a_planted_bug(tmp_path):
    r, report = chaos(tmp_path, "--unsafe", "--faults", "kill", "--seconds", "20", "--every", "0.5,1.5", "--seed", "3")
    assert r.returncode == 1, report
    assert "verdict      FAIL" in report
    lost = int(next(line.split()[1] for line in report.splitlines() if line.startswith("lost")))
    assert lost > 0, report


def test_one_host_under_every_fault_loses_nothing(tmp_path):
    faults = "kill,stop,supervisor,llm" + (",disk" if os.geteuid() == 0 else "")
    r, report = chaos(tmp_path, "--faults", faults, "--seconds", "40", "--seed", "11")
    assert r.returncode == 0, report
    assert "verdict      PASS" in report and "lost         0" in report and "duplicated   0" in report


@pytest.mark.netns
def test_three_hosts_under_every_fault_lose_nothing(tmp_path):
    why = hosts_tool.available()
    if why:
        pytest.skip(f"needs network namespaces: {why}")
    r, report = chaos(tmp_path, "--hosts", "--seconds", "40", "--seed", "12")
    assert r.returncode == 0, report
    assert "verdict      PASS" in report and "served twice 0" in report
