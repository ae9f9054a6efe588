"""`python -m handwriting build|stats|render`: build a dataset, look at its numbers or its ink.

python -m handwriting build --dataset iam_ondb --manual_dir DIR [--data_dir DIR]
python -m handwriting build --dataset synthetic [--data_dir DIR]
python -m handwriting stats --dataset iam_ondb [--data_dir DIR] [--json] [--plot PNG]
python -m handwriting render --dataset iam_ondb --id a01-000u-01 --out line.png

Bad data, a broken download or a missing file ends with one line and exit code 2
(`BUCKETED_RNN_DEBUG=1` shows the traceback). `stats --json` prints only JSON on stdout.
"""

import argparse
import json
import sys
import time

import cli_errors
from handwriting import dataset, report
from handwriting.features import FeatureConfig


def _parser() -> argparse.ArgumentParser:
  parser = cli_errors.ArgumentParser(prog="python -m handwriting", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--dataset", default="synthetic", help="iam_ondb, synthetic or a .npz export")
  common.add_argument(
    "--data_dir", default=None, help="default: $HANDWRITING_DATA_DIR or ~/tensorflow_datasets"
  )
  common.add_argument("--manual_dir", default=None, help="the IAM-OnDB download (iam_ondb only)")
  common.add_argument("--seed", type=int, default=0, help="synthetic only")
  common.add_argument("--num_train", type=int, default=5000, help="synthetic only")
  common.add_argument("--num_eval", type=int, default=500, help="synthetic only")
  commands.add_parser("build", parents=[common], help="build the dataset and its .npz export")
  stats = commands.add_parser("stats", parents=[common], help="counts, lengths, skipped lines")
  stats.add_argument("--json", action="store_true", help="print one JSON object")
  stats.add_argument("--plot", default=None, help="save length histograms to this PNG")
  stats.add_argument(
    "--resample_spacing",
    type=float,
    default=0.1,
    help="feature lengths are reported for this resampling (0: none)",
  )
  render = commands.add_parser("render", parents=[common], help="draw one line's ink")
  render.add_argument("--id", required=True, help="line id, e.g. a01-000u-01")
  render.add_argument("--out", required=True, help="PNG file to write")
  return parser


def _load_all(args) -> dict[str, list[dict]]:
  return {
    split: dataset.load_examples(
      args.dataset,
      split,
      data_dir=args.data_dir,
      manual_dir=args.manual_dir,
      seed=args.seed,
      num_train=args.num_train,
      num_eval=args.num_eval,
    )
    for split in dataset.SPLITS
  }


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.command == "build":
    start = time.perf_counter()
    if args.dataset == "iam_ondb":
      if args.manual_dir is None:
        parser.error("build --dataset iam_ondb needs --manual_dir (the IAM-OnDB download)")
      dataset.build_iam_ondb(args.manual_dir, args.data_dir)
    elif args.dataset == "synthetic":
      settings = {"seed": args.seed, "num_train": args.num_train, "num_eval": args.num_eval}
      dataset.write_export(
        dataset.export_path("synthetic", args.data_dir), _load_all(args), {"generator": settings}
      )
    else:
      parser.error(f"build: unknown --dataset {args.dataset!r} (iam_ondb or synthetic)")
    path = dataset.export_path(args.dataset, args.data_dir)
    print(f"built {args.dataset} in {time.perf_counter() - start:.1f} s; export: {path}")
  elif args.command == "stats":
    examples = _load_all(args)
    config = FeatureConfig(resample_spacing=args.resample_spacing or None)
    lengths = {split: report.split_lengths(lines, config) for split, lines in examples.items()}
    skipped = dataset.skipped_examples(args.dataset, args.data_dir)
    stats = report.dataset_stats(examples, lengths, skipped, config)
    print(json.dumps(stats) if args.json else report.format_stats(stats))
    if args.plot:
      report.plot_lengths(lengths, config, args.plot)
  elif args.command == "render":
    matches = [e for split in _load_all(args).values() for e in split if e["id"] == args.id]
    if not matches:
      raise ValueError(f"render: no line with --id {args.id!r} in {args.dataset}")
    report.render_example(matches[0], args.out)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(cli_errors.run(main))
