"""tools/bad_inputs.py: every bad input of the catalogue (over 250 at world 1) is a ValueError or
TypeError naming the argument, or the warning it should be; none crashes deep inside, none is
silently accepted ([LORA-CFG-2], [TP-ERR-1], [LORA-ERR-1])."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bad_input_catalogue_has_no_deep_crash_and_no_silent_acceptance(tmp_path):
    """[LORA-CFG-2] [TP-ERR-1] [LORA-ERR-1] the catalogue at world 1: 0 deep, 0 silent."""
    out = tmp_path / "bad.json"
    done = subprocess.run([sys.executable, "tools/bad_inputs.py", "--fail-on-bad", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    report = json.loads(out.read_text())
    bad = [f"{c['id']}: {c['outcome']}: {c['message']}" for c in report["cases"] if c["outcome"] in ("deep", "silent")]
    assert done.returncode == 0 and not bad, "\n".join(bad) or done.stderr[-2000:]
    assert len(report["cases"]) >= 250 and report["totals"]["warned"] >= 3, report["totals"]
