"""launch/table1.py end to end at smoke size: two methods distilled for two steps, one step count, a few prompts;
every cell of the table is filled with real scores, and a rerun reuses the students and the sample sets."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_table_has_every_cell(tmp_path):
    out = tmp_path / "table1"
    cmd = [sys.executable, str(REPO / "launch" / "table1.py"), "--quick", f"--out={out}",
           f"--data_dir={tmp_path / 'emoji'}"]
    subprocess.run(cmd, check=True, cwd=REPO, timeout=1500)
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["row"], r["steps"]) for r in rows} == {("TDD", "4"), ("TDD w'=7, CFG 1.7", "4"), ("LCM", "4")}
    for r in rows:
        assert all(r[k] not in ("", "nan") for k in ("fid", "kid", "prompt_accuracy", "teacher_mean_abs_delta")), r
        assert float(r["fid"]) > 0 and 0 <= float(r["prompt_accuracy"]) <= 1
    assert (out / "grid.png").stat().st_size > 0 and "| LCM |" in (out / "table.md").read_text()
    cached = sorted(p.name for p in (out / "samples").glob("*.npz"))
    assert cached == ["lcm_4.npz", "tdd_4.npz", "tdd_w__7__cfg_1_7_4.npz", "teacher_25.npz"]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "samples").glob("*.npz")}
    subprocess.run(cmd, check=True, cwd=REPO, timeout=1500)  # resumes: nothing is trained or rendered again
    assert {p: p.stat().st_mtime_ns for p in (out / "samples").glob("*.npz")} == stamps
