"""Command line: `python -m qlib demo` runs the main job; `python -m qlib report MODEL
--input 8x768` prints the size, output error and latency of a model's quantized forms."""
import argparse
import sys


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seed_int(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m qlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the end-to-end demo")
    sub.add_parser("info", help="print what qlib was compiled with")
    about = "size, output error and latency of a model, quantized each way"
    rep = sub.add_parser("report", help=about, description=about + " (int8 dynamic, NF4, int4, k-means 4-bit)")
    rep.add_argument("model", help="a torch.save(model) file (trusted: it is unpickled) or package.module:factory")
    rep.add_argument("--input", required=True, help="shape of the random float input, e.g. 8x768")
    rep.add_argument("--schemes", default="int8,nf4,int4,kmeans",
                     help="comma-separated, from int8, nf4, int4, kmeans (default: %(default)s)")
    rep.add_argument("--repeat", type=positive_int, default=60, help="timed calls per model (default: %(default)s)")
    rep.add_argument("--seed", type=seed_int, default=0,
                     help="seeds torch before the factory builds the model (its random init) and the random "
                          "input, so runs repeat their numbers (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "report":
        from . import report

        try:
            return report.main(args.model, args.input, args.schemes, args.repeat, args.seed)
        except ValueError as e:
            rep.error(str(e))  # (report's usage, not the top level's)
    from . import demo

    if args.command == "info":
        demo.print_build_info()
        return 0
    return demo.main()


if __name__ == "__main__":
    sys.exit(main())
