"""What a training run reads and where it writes (issue 27): it writes only into its own run folder, its data
is checked before the first step (labels within the class count, every image readable), and a resume checks
that the data and the model are those the run started with."""
import json
import os
import shutil

import pytest
from test_data import shard_config, write_set
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


def shard_run(out, data, **overrides):
    """A tiny run on the shard folder ``data``, with the class count the data gives."""
    config = shard_config(out, data, **overrides)
    config.model_config = {key: value for key, value in config.model_config.items() if key != "num_classes"}
    return config


def test_labels_beyond_the_manifests_classes_are_named(tmp_path):
    """A manifest whose num_classes was below its largest label trained: that class became the null class."""
    write_set(tmp_path / "set", num_classes=5)
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    (tmp_path / "set" / "manifest.json").write_text(json.dumps({**manifest, "num_classes": 3}))
    with pytest.raises(ValueError, match=r"^data: \S+/shard-00000.labels.npy: labels\[\d+\] is [34], outside the 3 "
                                         r"classes \(0 to 2\) of \S+/manifest.json"):
        train_in_process(shard_run(tmp_path / "run", tmp_path / "set", check_data=False))


@pytest.mark.parametrize("num_classes", [5, 4])
def test_a_resume_on_data_replaced_meanwhile_is_refused_naming_the_difference(tmp_path, num_classes):
    """A run resumed after --data was replaced by another encode continued on the other data (or, with another
    class count, died in a size-mismatch traceback)."""
    write_set(tmp_path / "set", num_classes=5, seed=0)
    train_in_process(shard_run(tmp_path / "run", tmp_path / "set", steps=2))
    shutil.rmtree(tmp_path / "set")
    write_set(tmp_path / "set", num_classes=num_classes, seed=1)
    words = "num_classes 5 then, 4 now" if num_classes == 4 else "sha256 '"
    with pytest.raises(ValueError, match=r"^resume: \S+00000002.pt was trained on other data than --data \S+ holds "
                                         rf"now \(.*{words}"):
        train_in_process(shard_run(tmp_path / "run", tmp_path / "set", steps=4))


def test_the_same_data_under_another_spelling_of_its_path_resumes(tmp_path, monkeypatch):
    write_set(tmp_path / "set")
    train_in_process(shard_run(tmp_path / "run", tmp_path / "set", steps=2))
    monkeypatch.chdir(tmp_path)
    assert train_in_process(shard_run(tmp_path / "run", "./set/", steps=4)).step == 4
