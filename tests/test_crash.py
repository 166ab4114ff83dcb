"""Crash safety: SIGKILL at 100 random points of ingest, snapshot, rollback, forget and gc."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_kill_9_at_100_points_never_damages_the_memory(tmp_path, tiny_dir):
    driver = Path(__file__).with_name("crash_driver.py")
    out = subprocess.run(
        [sys.executable, str(driver), str(tmp_path / "home"), str(tiny_dir), "100", "7"],
        capture_output=True, text=True, timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["failures"] == []
    assert result["kills"] == 100 and result["kills_after_progress"] >= 50  # most kills land mid-work
    assert result["missing_after_rerun"] == [] and result["verify_after_rerun"]
