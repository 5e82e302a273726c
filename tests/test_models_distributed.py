"""Multi-process training: two CPU processes on gloo under torchrun stay in step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("models_ddp_worker.py")


@pytest.mark.slow
def test_two_gloo_processes_train_the_same_weights(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
         str(tmp_path)],
        env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2 and ranks[0]["epochs"] == 2
    # Averaged gradients keep both replicas identical.
    assert ranks[0]["sum"] == pytest.approx(ranks[1]["sum"], rel=1e-6)
    assert ranks[0]["abs"] == pytest.approx(ranks[1]["abs"], rel=1e-6)
    assert ranks[0]["loss"][1] < ranks[0]["loss"][0]
    # Only rank 0 writes files.
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "resume.pt").exists()
