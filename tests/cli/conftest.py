"""What the `fastdit` command tests share: a tiny pixel-space checkpoint, and the command run in this process."""
import pytest
from parity import save_tiny_checkpoint

from fastdit.cli import main


@pytest.fixture(scope="module")
def pixel_ckpt(tmp_path_factory):
    """RGB pixel-space model: 8x8 images, written without a VAE."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "pixel.pt", in_channels=3, input_size=8,
                                patch_size=4)


@pytest.fixture
def run_cli(capsys):
    """``run_cli(argv)``: (exit code, stderr lines) of ``fastdit argv`` run in this process."""
    def run(argv):
        try:
            code = main(argv)
        except SystemExit as exit:  # argparse's usage errors
            code = exit.code
        return code, capsys.readouterr().err.strip().splitlines()
    return run
