"""Command line: `python -m qlib demo` runs the main job."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m qlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the end-to-end demo")
    sub.add_parser("info", help="print what qlib was compiled with")
    args = parser.parse_args(argv)
    from . import demo

    if args.command == "info":
        demo.print_build_info()
        return 0
    return demo.main()


if __name__ == "__main__":
    sys.exit(main())
