"""The KServe tensor decoder's fuzzing (kserve_tensors_fuzz.py), in a pytest process of its own:
it imports loraplex.v1.kserve_v2_pb2, and that module's `inference.*` protobuf symbols clash with
tritonclient's (which test_kserve_v2 imports) in one process's descriptor pool."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
CASES = Path(__file__).with_name("kserve_tensors_fuzz.py")


def test_fuzz_kserve_tensors_in_a_process_of_their_own() -> None:
    pytest = Path(sys.executable).with_name("pytest")  # the console script: the checkout is not on sys.path
    run = subprocess.run([str(pytest), "-q", "-p", "no:cacheprovider", str(CASES)], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    assert re.search(r"^3 passed", run.stdout, re.MULTILINE), run.stdout[-2000:]
