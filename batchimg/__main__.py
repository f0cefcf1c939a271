"""`python -m batchimg` and the `batchimg` command."""

import gc


def main() -> None:
    # Start-up makes tens of thousands of objects (modules, classes, functions), few of them
    # garbage: with the collector paused while they load, no pass walks them (about 10 ms).
    # Paused, it still counts them as young, so the first pass after would walk them all (2-5
    # ms, even for --help): frozen, they are left out of every pass, as a run's engine is.
    gc.disable()
    try:
        from .cli import main as cli
    finally:
        gc.freeze()
        gc.enable()
    cli()


if __name__ == "__main__":
    main()
