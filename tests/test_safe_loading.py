"""A checkpoint's state.pt comes back from storage that others may write to: loading it must never run
code. A pickle that would run a command on load is refused, and the command does not run."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import ray.train
import torch

from tsdae.train import checkpoint


class RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_state_file_that_would_run_code_is_refused(tmp_path):
    folder, marker = tmp_path / "ckpt", tmp_path / "pwned"
    folder.mkdir()
    with open(folder / checkpoint.STATE_FILE, "wb") as f:
        pickle.dump({"model": {}, "step": RunsACommand(marker)}, f, protocol=2)
    (folder / checkpoint.COMPLETE_FILE).write_text(json.dumps({"step": 1, "position": 0}))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        checkpoint.load_state(ray.train.Checkpoint.from_directory(str(folder)))
    assert not marker.exists()


def test_a_state_file_of_tensors_and_plain_values_loads(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"model": {"w": torch.ones(2)}, "step": 3, "position": {"epoch": 0}}, folder / checkpoint.STATE_FILE)
    (folder / checkpoint.COMPLETE_FILE).write_text(json.dumps({"step": 3, "position": 0}))
    state = checkpoint.load_state(ray.train.Checkpoint.from_directory(str(folder)))
    assert state["step"] == 3 and torch.equal(state["model"]["w"], torch.ones(2))
