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
from handwriting import dataset, iam_ondb, report
from handwriting.alphabet import Alphabet
from handwriting.features import FeatureConfig

DEFAULT_DATA_DIR = "$HANDWRITING_DATA_DIR, else ~/tensorflow_datasets"
# Pre-wrapped: argparse would break the address at its hyphens. The description is one paragraph,
# as cli_errors.ArgumentParser shows only the first.
BUILD_DESCRIPTION = """\
Build a dataset once, into --data_dir: a numpy export <data_dir>/<dataset>.npz, which
stats, render, train.py and --dataset PATH.npz read without TFDS, and for iam_ondb the
TFDS dataset `iam_ondb` as well."""
BUILD_EPILOG = f"""\
iam_ondb needs --manual_dir, the folder you downloaded IAM-OnDB into (free for research
after registering at https://fki.tic.heia-fr.ch/databases/iam-on-line-handwriting-database),
unchanged: {iam_ondb.STROKES_ARCHIVE} and {iam_ondb.ASCII_ARCHIVE} (or both extracted), and
the split files {", ".join(iam_ondb.SPLIT_FILES.values())}.
README: Getting IAM-OnDB. synthetic needs no download.

  python -m handwriting build --dataset iam_ondb --manual_dir ~/iam-ondb
  python -m handwriting build --dataset synthetic --data_dir data"""


SYNTHETIC_DEFAULTS = {"seed": 0, "num_train": 5000, "num_eval": 500}


def _add_data_flags(parser: argparse.ArgumentParser, build: bool) -> None:
  """The flags that say which dataset, where it is, and how the synthetic one is generated; what
  --data_dir and --manual_dir mean differs between writing a build and reading one."""
  if build:
    dataset_help = "what to build (default: %(default)s)"
    data_dir_help = "where to write the build and its export"
    manual_dir_help = "iam_ondb only, and needed: the folder with the IAM-OnDB download (below)"
  else:
    dataset_help = "iam_ondb, synthetic or the path of a .npz export (default: %(default)s)"
    data_dir_help = "where `build` wrote iam_ondb"
    manual_dir_help = (
      "iam_ondb only: the folder with the IAM-OnDB download, to build it first when --data_dir "
      "has no build (see build --help)"
    )
  choices = dataset.DATASETS if build else None  # reading also takes a .npz export's path
  parser.add_argument("--dataset", choices=choices, default="synthetic", help=dataset_help)
  parser.add_argument(
    "--data_dir", metavar="DIR", help=f"{data_dir_help} (default: {DEFAULT_DATA_DIR})"
  )
  parser.add_argument("--manual_dir", metavar="DIR", help=manual_dir_help)
  parser.add_argument(
    "--seed",
    type=cli_errors.non_negative_int,
    default=SYNTHETIC_DEFAULTS["seed"],
    help="synthetic only: generator seed, >= 0 (default: %(default)s)",
  )
  parser.add_argument(
    "--num_train",
    type=cli_errors.positive_int,
    metavar="N",
    default=SYNTHETIC_DEFAULTS["num_train"],
    help="synthetic only: lines in train (default: %(default)s)",
  )
  parser.add_argument(
    "--num_eval",
    type=cli_errors.positive_int,
    metavar="N",
    default=SYNTHETIC_DEFAULTS["num_eval"],
    help="synthetic only: lines in each of validation, validation2 and test (default: %(default)s)",
  )


def _parser() -> argparse.ArgumentParser:
  parser = cli_errors.ArgumentParser(prog="python -m handwriting", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  build = commands.add_parser(
    "build",
    help="build the dataset and its .npz export",
    description=BUILD_DESCRIPTION,
    epilog=BUILD_EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  _add_data_flags(build, build=True)
  stats = commands.add_parser("stats", help="counts, lengths, skipped lines")
  _add_data_flags(stats, build=False)
  stats.add_argument("--json", action="store_true", help="print one JSON object")
  stats.add_argument(
    "--plot", metavar="FILE", help="save length histograms to this PNG (.png added if no suffix)"
  )
  stats.add_argument(
    "--resample_spacing",
    type=cli_errors.non_negative_float,
    default=0.1,
    help="feature lengths are reported for this resampling (0: none; default: %(default)s)",
  )
  stats.add_argument(
    "--bad_examples",
    choices=dataset.BAD_EXAMPLE_POLICIES,
    default="error",
    help="a line whose ink or text train.py would refuse (NaN points, no ink, a character "
    "outside the alphabet): "
    "stop naming it (error, the default, as train.py's config.data.bad_examples) or leave it "
    "out and list it under skipped (skip)",
  )
  render = commands.add_parser("render", help="draw one line's ink")
  _add_data_flags(render, build=False)
  render.add_argument("--id", required=True, help="line id, e.g. a01-000u-01")
  render.add_argument(
    "--out",
    metavar="FILE",
    required=True,
    help="PNG file to write (.png added if no suffix; .pdf, .svg and others too)",
  )
  return parser


def _load_all(args) -> dict[str, list[dict]]:
  return {
    split: dataset.load_examples(split=split, **_data_arguments(args)) for split in dataset.SPLITS
  }


def _data_arguments(args) -> dict:
  return {
    "dataset": args.dataset,
    "data_dir": args.data_dir,
    "manual_dir": args.manual_dir,
    "seed": args.seed,
    "num_train": args.num_train,
    "num_eval": args.num_eval,
  }


def _load_checked(args) -> tuple[dict[str, list[dict]], list[dict]]:
  """Every split with each line checked as train.py checks it (`dataset.validate_examples`), and
  the lines left out: the build's own, then those `--bad_examples skip` dropped.

  Without the check one NaN point stops the report with numpy's "cannot convert float NaN to
  integer", naming no line.
  """
  examples = _load_all(args)
  skipped = list(dataset.skipped_examples(args.dataset, args.data_dir))
  source = str(dataset.data_source(**_data_arguments(args)))
  for split, lines in examples.items():
    try:
      examples[split], bad = dataset.validate_examples(
        lines, split, Alphabet(), args.bad_examples, source
      )
    except dataset.BadExampleError as error:
      raise dataset.BadExampleError(f"{error}; --bad_examples skip leaves such lines out") from None
    skipped += bad
  return examples, skipped


def _check_data_dir(data_dir: str | None) -> None:
  """A --data_dir that is a file fails late and in TFDS's or the OS's words ("File exists")."""
  path = dataset.user_path(data_dir)
  if path is not None and path.exists() and not path.is_dir():
    raise cli_errors.UsageError(
      f"--data_dir {path}: is a file, not a folder (an export file is read with --dataset PATH.npz)"
    )


def _check_flags_fit_the_dataset(args, parser: argparse.ArgumentParser) -> None:
  """A flag the dataset does not read is an error, not silently another dataset's report (the
  default `--dataset synthetic` with an IAM-OnDB `--data_dir`)."""
  if args.dataset == "synthetic" and args.command == "build":
    unread, why = ["--manual_dir"], "the synthetic set is generated, not built from a download"
  elif args.dataset == "synthetic":
    unread = ["--data_dir", "--manual_dir"]
    why = "the synthetic set is generated; name the data to read with --dataset (iam_ondb, or a "
    why += ".npz export's path)"
  else:
    unread = [f"--{name}" for name in SYNTHETIC_DEFAULTS]
    why = "only the synthetic set's generator reads it"
  given = [flag for flag in unread if getattr(args, flag[2:]) != SYNTHETIC_DEFAULTS.get(flag[2:])]
  if given:
    parser.error(f"{' and '.join(given)} with --dataset {args.dataset}: {why}")


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  _check_data_dir(args.data_dir)
  _check_flags_fit_the_dataset(args, parser)
  if args.command == "build":
    start = time.perf_counter()
    if args.dataset == "iam_ondb":
      if args.manual_dir is None:
        parser.error("build --dataset iam_ondb needs --manual_dir (the IAM-OnDB download)")
      dataset.build_iam_ondb(args.manual_dir, args.data_dir)
    else:
      settings = {"seed": args.seed, "num_train": args.num_train, "num_eval": args.num_eval}
      dataset.write_export(
        dataset.export_path("synthetic", args.data_dir), _load_all(args), {"generator": settings}
      )
    path = dataset.export_path(args.dataset, args.data_dir)
    print(f"built {args.dataset} in {time.perf_counter() - start:.1f} s; export: {path}")
  elif args.command == "stats":
    plot = cli_errors.figure_file("--plot", args.plot) if args.plot else None
    examples, skipped = _load_checked(args)
    config = FeatureConfig(resample_spacing=args.resample_spacing or None)
    lengths = {split: report.split_lengths(lines, config) for split, lines in examples.items()}
    stats = report.dataset_stats(examples, lengths, skipped, config)
    print(json.dumps(stats) if args.json else report.format_stats(stats))
    if plot:
      with cli_errors.naming_write_errors("--plot", plot):
        report.plot_lengths(lengths, config, str(plot))
      print(f"wrote {plot}", file=sys.stderr if args.json else sys.stdout)
  elif args.command == "render":
    out = cli_errors.figure_file("--out", args.out)
    matches = [e for split in _load_all(args).values() for e in split if e["id"] == args.id]
    if not matches:
      raise ValueError(f"render: no line with --id {args.id!r} in {args.dataset}")
    with cli_errors.naming_write_errors("--out", out):
      report.render_example(matches[0], str(out))
    print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(cli_errors.run(main))
