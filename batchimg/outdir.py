"""The output directory: checked before anything is sent, and held by one run at a time.

`check_output` turns every way a directory can be unusable (a file where the directory should
be, a read-only filesystem, a full disk, a ledger that is a directory or a symbolic link) into
a `UsageError` that says what to do: exit 2, nothing sent, nothing bought that could not be
kept. `exclusive` holds `DIR/.batchimg.lock` while a run (or `verify --repair`) writes there.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import UsageError
from .ledger import LEDGER_NAME
from .stores.local import ORPHANS_DIR, TEMP_DIR

LOCK_NAME = ".batchimg.lock"  # held while a run writes into the directory
#: Held (shared) by each worker of a Ray run while it writes into the directory: a run that
#: starts waits until no worker of an earlier one (its driver killed) is left.
WORKERS_LOCK_NAME = ".batchimg.workers"
WORKERS_GONE_WAIT_S = 20.0
#: The batch state of `run --batch-api` (`engine.batchstate`): DIR/batches/state.jsonl. Named
#: here so that a run can tell there is none without importing that module.
STATE_DIR = "batches"
STATE_NAME = "state.jsonl"


def batch_state_path(out_dir: Path) -> Path:
    """Where an output directory's batch state is (see `STATE_DIR`)."""
    return out_dir / STATE_DIR / STATE_NAME


#: Less free space than this at the start and a run would buy images it cannot keep.
MIN_FREE_BYTES = 64 << 20
#: Files a run writes in place: each must be a plain file of the directory's own.
_OWN_FILES = (LEDGER_NAME, LOCK_NAME, WORKERS_LOCK_NAME, "metadata.jsonl", "metadata-svg.jsonl")
#: Directories a run moves files into by rename: each must be a directory on the same
#: filesystem as the output directory (its temp area, `.tmp`, is where files start from).
_OWN_DIRS = ("images", "shards", TEMP_DIR, ORPHANS_DIR)


def check_output(out: Path) -> None:
    """UsageError unless `out` can take a run: a directory (made if missing) that is written
    to, with room, whose ledger and lock are plain files (a symbolic link would make the run
    write, and cut a torn line from, whatever file it points at)."""
    if out.is_symlink() and not out.is_dir():
        raise UsageError(f"--out {out} is a broken symbolic link")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory: give a directory to write to")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --out {out}: {exc.strerror or exc}") from None
    for name in _OWN_FILES:
        path = out / name
        if path.is_symlink():
            raise UsageError(
                f"{path} is a symbolic link: batchimg writes its ledger, lock and metadata only "
                "as plain files of the output directory (copy the file there instead)"
            )
        if path.exists() and not path.is_file():
            raise UsageError(f"{path} is not a file: move it away, then re-run")
    device = out.stat().st_dev
    for name in _OWN_DIRS:
        path = out / name
        if not (path.exists() or path.is_symlink()):
            continue
        if path.is_symlink() and name == TEMP_DIR:  # it is emptied at every start
            raise UsageError(
                f"{path} is a symbolic link: batchimg empties its temp area at every start, "
                "and only its own directory; remove the link, then re-run"
            )
        if not path.is_dir():
            raise UsageError(f"{path} is not a directory: move it away, then re-run")
        if path.stat().st_dev != device:
            raise UsageError(
                f"{path} is on another filesystem than {out}: batchimg moves finished files "
                "into it by rename, which cannot cross filesystems; give an --out on one"
            )
        _probe(path, f"cannot write to {path}")
    _probe(out, f"cannot write to --out {out}")
    free = shutil.disk_usage(out).free
    if free < MIN_FREE_BYTES:
        raise UsageError(
            f"only {free / 2**20:.1f} MiB free where --out {out} is: free some space first (a "
            "run would buy images it cannot keep)"
        )


def _probe(directory: Path, what: str) -> None:
    """UsageError unless a file can be written (and synced) in `directory`."""
    probe = directory / f".batchimg-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"x")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise UsageError(
            f"{what}: {exc.strerror or exc} (a read-only filesystem, or no permission?)"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


@contextlib.contextmanager
def exclusive(out_dir: Path, wait_s: float = 0.0) -> Iterator[None]:
    """Hold DIR/.batchimg.lock for the run: two runs on one directory would each resume from
    the same ledger, buy the same images and (webdataset) number shards alike. `wait_s`: how
    long to wait for a holder to end (a Ray worker whose driver was killed, still ending)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(
            out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644
        )
    except OSError as exc:
        raise UsageError(f"cannot open {out_dir / LOCK_NAME}: {exc.strerror or exc}") from None
    try:
        if not _flock(fd, wait_s):
            raise UsageError(
                f"another batchimg run is using {out_dir}: let it finish (or stop it) first"
            )
        _no_workers_left(out_dir)
        yield
    finally:
        os.close(fd)  # releases the lock


def _no_workers_left(out_dir: Path) -> None:
    """Wait (a little) until no worker of an earlier Ray run writes here: when a driver is
    killed, Ray ends its workers moments later, and until then they still append."""
    path = out_dir / WORKERS_LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        if not _flock(fd, WORKERS_GONE_WAIT_S):  # else released at once by the close
            raise UsageError(
                f"workers of an earlier Ray run still write to {out_dir} (its driver ended, "
                "they did not): stop them (`ray stop`, or their processes), then re-run"
            )
    finally:
        os.close(fd)


def _flock(fd: int, wait_s: float) -> bool:
    """Take an exclusive flock, waiting up to `wait_s` for its holder; False if it did not
    come."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


@contextlib.contextmanager
def worker_hold(out_dir: Path) -> Iterator[None]:
    """A Ray worker's share of the directory (see WORKERS_LOCK_NAME), for as long as it runs."""
    fd = os.open(
        out_dir / WORKERS_LOCK_NAME,
        os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
        0o644,
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)
