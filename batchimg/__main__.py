"""`python -m batchimg` and the `batchimg` command."""

import gc


def main() -> None:
    # Start-up makes tens of thousands of objects (modules, classes, the catalog), none of them
    # garbage: with the collector paused while they load, no pass walks them (about 10 ms).
    gc.disable()
    try:
        from .cli import main as cli
    finally:
        gc.enable()
    cli()


if __name__ == "__main__":
    main()
