"""``fastdit.cli.cache_flags``: the --cache flags parse to the policy they name, and a misplaced flag is one error."""
import argparse

import pytest

from fastdit.cli.cache_flags import add_cache_arguments, cache_from_args
from fastdit.diffusion.caching import FORA, FirstBlockCache, TaylorSeer


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_cache_arguments(parser)
    return cache_from_args(parser.parse_args(argv))


@pytest.mark.parametrize("argv, expected", [
    ((), None),
    (("--cache", "fora"), FORA()),
    (("--cache", "fora", "--cache-interval", "3", "--cache-warmup", "2"), FORA(interval=3, warmup=2)),
    (("--cache", "taylorseer", "--cache-order", "2"), TaylorSeer(order=2)),
    (("--cache", "fbcache", "--cache-threshold", "0.2"), FirstBlockCache(threshold=0.2)),
])
def test_flags_name_the_policy(argv, expected):
    assert parse(*argv) == expected


@pytest.mark.parametrize("argv, match", [
    (("--cache-interval", "3"), "--cache-interval needs --cache"),
    (("--cache", "fora", "--cache-order", "2"), "--cache-order applies to --cache taylorseer, not fora"),
    (("--cache", "fbcache", "--cache-interval", "2"), "--cache-interval applies to --cache taylorseer or fora"),
    (("--cache", "taylorseer", "--cache-order", "3"), "taylorseer order must be 1 or 2"),
    (("--cache", "fbcache", "--cache-threshold", "-1"), "fbcache threshold must be a finite number >= 0"),
])
def test_a_bad_flag_is_one_clear_error(argv, match):
    with pytest.raises(ValueError, match=match):
        parse(*argv)
