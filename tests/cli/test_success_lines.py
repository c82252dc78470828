"""Every command says what it did: one line on stdout with the output path, with --no-progress too, and a
finished training run rerun says it is finished."""
from fastdit.cli import main


def test_sample_names_what_it_wrote(tmp_path, capsys, torch_path):
    out = tmp_path / "out"
    assert main(["sample", "--ckpt", "digits", "--classes", "3", "4", "--steps", "2", "--no-progress",
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"fastdit sample: wrote 2 images to {out}: samples.npz, grid.png and run.json"]


def test_train_names_its_model_and_a_rerun_says_it_is_finished(tmp_path, capsys, torch_path):
    run = tmp_path / "run"
    argv = ["train", "--preset", "digits", "--steps", "2", "--ckpt-every", "2", "--no-progress", "--out", str(run)]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"fastdit train: trained steps 1 to 2; wrote the EMA model to {run / 'model'} and checkpoints to "
        f"{run / 'checkpoints'}"]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"fastdit train: {run} had already finished its 2 steps; the EMA model is in {run / 'model'}"]
