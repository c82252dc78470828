"""python -m fastdit.bench.caching_study, the table of docs/caching.md: its settings parser, metrics and table."""
import math
import warnings

import numpy as np
import pytest

from fastdit.bench import caching_study
from fastdit.diffusion.caching import FORA, FirstBlockCache, TaylorSeer
from fastdit.evaluation.metrics import frechet_distance


pytestmark = pytest.mark.usefixtures("torch_path")  # the cache logic, not the kernels: see conftest


def test_settings_parse_as_the_table_names_them():
    assert caching_study.parse_setting("taylorseer:interval=5,order=2") == TaylorSeer(interval=5, order=2)
    assert caching_study.parse_setting("fbcache:threshold=0.1") == FirstBlockCache(threshold=0.1)
    assert caching_study.parse_setting("fora") == FORA()
    with pytest.raises(ValueError, match="unknown setting 'order'; fora takes interval, warmup"):
        caching_study.parse_setting("fora:order=2")
    with pytest.raises(ValueError, match="expected method:name=value,..., got 'fora:interval'"):
        caching_study.parse_setting("fora:interval")


def test_bad_settings_flag_is_one_line_naming_it(capsys):
    with pytest.raises(SystemExit):
        caching_study.main(["--settings", "fbcache:threshold=x"])
    assert "argument --settings: could not convert string to float: 'x'" in capsys.readouterr().err


def test_frechet_distance_and_psnr():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(4000, 3))
    same, shifted = (frechet_distance(*caching_study.gaussian(moved), *caching_study.gaussian(features))
                     for moved in (features, features + [2, 0, 0]))
    assert same == pytest.approx(0, abs=1e-9)
    assert shifted == pytest.approx(4, rel=1e-6)  # same covariance, means 2 apart along one axis: the squared shift
    images = np.zeros((2, 4), np.uint8)
    other = images.copy()
    other[0, 0] = 16  # MSE 256 / 8 = 32
    assert caching_study.psnr(other, images) == pytest.approx(10 * math.log10(255**2 / 32))
    assert caching_study.psnr(images, images) == math.inf


def test_a_small_study_counts_blocks_per_guidance_scale_and_tabulates():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 4 samples: a singular covariance in the Frechet distance
        result = caching_study.study(samples=4, batch=2, settings=[None, FORA(interval=2)], cfg_scales=[4.0, 1.0],
                                     timing_samples=2, timing_rounds=2)
    exact, fora = result["rows"]
    assert exact["cfg4_blocks_per_image"] == exact["cfg1_blocks_per_image"] == 50 * 4  # digits: 50 steps, 4 blocks
    assert fora["cfg4_blocks_per_image"] == fora["cfg1_blocks_per_image"] == 25 * 4
    assert exact["cfg4_psnr"] == math.inf and fora["cfg1_psnr"] < math.inf
    # The floor each time ratio is read against: FORA 2 runs half the blocks.
    assert fora["cfg4_block_floor"] == fora["cfg1_block_floor"] == 0.5 and fora["cfg4_time_ratio"] > 0
    table = caching_study.markdown(result).splitlines()
    assert table[0].startswith("| setting | blocks per image (cfg4 / cfg1) | time vs exact (cfg4) (floor) |")
    assert table[2].startswith("| exact | 200 | 1.00 (1.00) | 1.00 (1.00) |") and table[2].endswith("| ∞ | ∞ |")
    assert table[3].startswith("| fora (interval=2, warmup=0) | 100 |")
