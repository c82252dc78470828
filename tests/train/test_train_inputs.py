"""What a training run reads and where it writes (issue 27): it writes only into its own run folder, its data
is checked before the first step (labels within the class count, every image readable), and a resume checks
that the data and the model are those the run started with."""
import json
import os

import pytest
from test_trainer import tiny_config, train_in_process

from fastdit.models import checkpoint as checkpoints
from fastdit.train import run_folder

pytestmark = pytest.mark.usefixtures("torch_path")  # runs and their inputs, not the kernels: see conftest


def test_a_saved_model_folder_is_refused_and_left_alone(tmp_path):
    """`fastdit train --out` on a save_pretrained folder overwrote its config.json (the model no longer loaded)."""
    trainer = train_in_process(tiny_config(tmp_path / "run", steps=2))
    checkpoints.save_pretrained(trainer.ema, tmp_path / "saved")
    before = {name: (tmp_path / "saved" / name).read_bytes() for name in os.listdir(tmp_path / "saved")}
    with pytest.raises(ValueError, match=r"^--out \S+saved: holds files that no `fastdit train` run wrote "
                                         r"\(config.json, model.safetensors\)"):
        train_in_process(tiny_config(tmp_path / "saved", steps=2))
    assert {name: (tmp_path / "saved" / name).read_bytes() for name in os.listdir(tmp_path / "saved")} == before


def test_a_run_folder_is_marked_and_an_unmarked_one_of_an_older_run_resumes(tmp_path):
    out = tmp_path / "run"
    train_in_process(tiny_config(out, steps=2))
    assert json.loads((out / ".fastdit-run.json").read_text()) == {"command": "train"}
    os.remove(out / ".fastdit-run.json")  # as a fastdit from before the marker left it
    os.remove(out / ".lock")
    assert train_in_process(tiny_config(out, steps=4)).step == 4
    assert run_folder.checkpoint_paths(out / "checkpoints")[-1].endswith("00000004.pt")
