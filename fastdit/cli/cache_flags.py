"""The feature-cache flags of ``fastdit sample``: ``--cache taylorseer|fbcache|fora`` and its settings."""
from fastdit.diffusion.caching import METHODS, make_config

# flag -> (the policy setting it sets, the methods that take it)
SETTING_FLAGS = {
    "--cache-interval": ("interval", ("taylorseer", "fora")),
    "--cache-order": ("order", ("taylorseer",)),
    "--cache-warmup": ("warmup", METHODS),
    "--cache-threshold": ("threshold", ("fbcache",)),
}


def add_cache_arguments(parser):
    group = parser.add_argument_group("feature caching (docs/caching.md)")
    group.add_argument("--cache", choices=METHODS, help="skip blocks at some steps, reusing or forecasting what "
                       "they add: taylorseer (forecast), fbcache (first-block residual test), fora (reuse); "
                       "default: off, every block at every step")
    group.add_argument("--cache-interval", type=int, metavar="N", help="taylorseer, fora: all blocks every N steps")
    group.add_argument("--cache-order", type=int, metavar="K", help="taylorseer: Taylor order, 1 or 2")
    group.add_argument("--cache-warmup", type=int, metavar="N", help="all blocks at the first N steps")
    group.add_argument("--cache-threshold", type=float, metavar="X",
                       help="fbcache: run the other blocks once the first block's residual changed by X (relative)")


def cache_from_args(args):
    """The cache policy the flags ask for (None: off); a setting flag without --cache, or for a method that does
    not take it, is a ValueError naming the flag."""
    given = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in SETTING_FLAGS}
    given = {flag: value for flag, value in given.items() if value is not None}
    if args.cache is None:
        if given:
            raise ValueError(f"{next(iter(given))} needs --cache (one of {', '.join(METHODS)})")
        return None
    for flag in given:
        methods = SETTING_FLAGS[flag][1]
        if args.cache not in methods:
            raise ValueError(f"{flag} applies to --cache {' or '.join(methods)}, not {args.cache}")
    return make_config(args.cache, **{SETTING_FLAGS[flag][0]: value for flag, value in given.items()})
