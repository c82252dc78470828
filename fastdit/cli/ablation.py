"""`fastdit ablation`: the paper's block-design ablation on the digits (``fastdit.bench.ablation``)."""
from fastdit.bench import ablation
from fastdit.train.trainer import PRESETS


def add_arguments(parser):
    parser.description = ablation.__doc__.split("\n\n")[0]
    parser.add_argument("--out", required=True, help="output directory (docs/ablation for the committed results)")
    parser.add_argument("--steps", type=int, default=PRESETS[ablation.PRESET]["steps"],
                        help="training steps per design (default: %(default)s, the digits preset's)")
    parser.add_argument("--jobs", type=int, default=2, help="designs trained at once (one CPU thread "
                        "each; default: %(default)s)")
    parser.add_argument("--runs", help="where the training runs go (checkpoints: tens of MB each); default OUT/runs")


def run(args) -> int:
    if args.steps <= 0 or args.jobs <= 0:
        raise ValueError(f"--steps and --jobs: expected positive integers, got {args.steps} and {args.jobs}")
    for result in ablation.ablate(args.out, args.steps, args.jobs, args.runs):
        print(f"{ablation.NAMES[result['block']]:>16}: final loss {result['final_loss']:.4f}, accuracy "
              f"{result['accuracy_unguided']:.0%} unguided, {result['accuracy_guided']:.0%} guided")
    return 0
