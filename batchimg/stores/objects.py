"""The object store: `--out s3://bucket/prefix` (or `gs://`, or any fsspec URL).

Objects are written whole under their final key, one PUT each (the library goes multipart for
large ones), and never overwritten: on S3 the PUT is conditional (`If-None-Match: *`), so an
object already under the key (an earlier attempt's leftover that no ledger line claims) is
copied aside to `PREFIX/.orphans/` first. What the store confirmed is durable, so `sync` has
nothing left to do. Files on their way in wait in a local temp area inside the run's state
directory (`--state`), which is also where the ledger's working copy lives (see `remote`).

Errors are sorted as the engine needs them: transient ones are retried by the library itself
(s3fs's retry classes and botocore's), `StoreRefused` (no permission, no bucket, credentials
gone) stops the run, and `ObjectRejected` (a key or size the store will not take) fails one item.

fsspec's blocking calls cannot run on a thread that runs an event loop: called from one, a call
is handed to a short-lived thread (only start-up does this; writers call from their threads).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlsplit, urlunsplit

from ..errors import ObjectRejected, StorageError, StoreRefused, UsageError
from .local import TEMP_DIR, TempArea, aside_name

T = TypeVar("T")

PARKED_DIR = "parked"  # in the state directory: files the store refused, paid for
PARKED_LINES = "parked.jsonl"  # their items' ledger lines, waiting for the files to go up
#: Extras by URL scheme: what `pip install 'batchimg[EXTRA]'` brings.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
#: Errors no retry mends and no item can avoid: the run stops (exit 3).
_REFUSED = (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)
#: errno values of a request the store refuses for this object only (its key, its size).
_REJECTED_ERRNOS = {errno.EINVAL, errno.EMSGSIZE, errno.ENAMETOOLONG, errno.EFBIG}


def is_url(location: str | Path) -> bool:
    """A URL with a scheme other than `file` (`s3://b/p`, `gs://b/p`, `memory://p`)."""
    text = str(location)
    scheme = urlsplit(text).scheme
    return "://" in text and len(scheme) > 1 and scheme != "file"


def local_path(location: str | Path) -> Path:
    """A plain path, or the path of a `file://` URL."""
    text = str(location)
    return Path(urlsplit(text).path) if text.startswith("file://") else Path(text)


def shown(url: str) -> str:
    """A URL fit for messages and files: any user:password in it is dropped."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def open_filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem for a URL and the root path in it; UsageError (exit 2) for a
    missing extra or an unknown scheme. Credentials and endpoints come from each library's
    usual configuration (for S3: the AWS variables and files, `AWS_ENDPOINT_URL` included)."""
    parts = urlsplit(url)
    scheme = parts.scheme
    extra = EXTRAS.get(scheme)
    if "@" in parts.netloc:
        raise UsageError(
            f"{shown(url)}: put credentials in the environment or the storage library's "
            "configuration, never in the URL (it shows up in logs and process lists)"
        )
    segments = parts.path.strip("/").split("/") if parts.path.strip("/") else []
    doubled = "//" in parts.path
    if parts.query or parts.fragment or doubled or any(p in ("", ".", "..") for p in segments):
        raise UsageError(
            f"{shown(url)}: give a plain bucket and prefix (no '?', '#', '.', '..' or "
            "empty parts), e.g. s3://bucket/run1"
        )
    if scheme in ("memory", "memfs"):
        raise UsageError(f"{shown(url)}: an in-memory store is gone when the run ends")
    try:
        import fsspec
        from fsspec.core import url_to_fs
    except ImportError:
        raise UsageError(
            f"{shown(url)} needs fsspec: pip install 'batchimg[{extra or 's3'}]'"
        ) from None
    options: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False}
    if extra == "s3":
        options["config_kwargs"] = {"max_pool_connections": 64}
    try:
        fsspec.get_filesystem_class(scheme)
        fs, root = url_to_fs(url, **options)
    except ImportError:
        hint = f"pip install 'batchimg[{extra}]'" if extra else f"install fsspec's {scheme} module"
        raise UsageError(f"{shown(url)} needs a library not installed: {hint}") from None
    except ValueError as exc:
        raise UsageError(f"{shown(url)}: not a storage URL fsspec knows ({exc})") from None
    root = str(root).rstrip("/")
    if not root or (extra is not None and "/" not in root and len(root) < 3):
        raise UsageError(f"{shown(url)}: give a bucket (and a prefix), e.g. s3://bucket/run1")
    return fs, root


class ObjectStore:
    """Objects under one prefix of an fsspec filesystem, as a `Store` (see `base`)."""

    #: Writer threads: each PUT waits on the network, not on a disk, so many go at once, and
    #: one item at a time (a batch would only make its items wait for each other's PUTs).
    writer_threads = 16
    writer_batch = 1
    #: Items waiting on their PUTs may queue up to this many times `--concurrency` beyond the
    #: requests in flight (back-pressure: a slow store slows the requests only past that).
    upload_queue = 1

    def __init__(self, url: str, fs: Any, root: str, state_dir: Path) -> None:
        self.url = url.rstrip("/")
        self.fs = fs
        self.root = root
        self.state_dir = state_dir
        self._temps = TempArea(state_dir / TEMP_DIR)
        self.conditional = "s3" in _protocols(fs)  # writes that fail if the key exists / moved
        from concurrent.futures import ThreadPoolExecutor  # only a bucket's store needs it

        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store-call")

    # -- the Store interface --

    @property
    def location(self) -> str:
        return shown(self.url)

    @property
    def temp_dir(self) -> Path:
        return self._temps.dir

    def clean_temps(self) -> None:
        self._temps.clean()

    def new_temp(self, hint: str) -> Path:
        return self._temps.new(hint)

    def key(self, name: str) -> str:
        """The full key of an object; ValueError for a name that would leave the prefix."""
        parts = PurePosixPath(name).parts
        if not parts or name.startswith("/") or ".." in parts:
            raise ValueError(f"not an object name of this store: {name!r}")
        return f"{self.root}/{name}"

    def put(self, name: str, temp: Path) -> None:
        key = self.key(name)
        self._call(self._put, key, str(temp))
        with contextlib.suppress(OSError):
            os.unlink(temp)

    def _put(self, key: str, temp: str) -> None:
        try:
            if self.conditional:
                try:
                    self.fs.put_file(temp, key, mode="create")
                    return
                except FileExistsError:
                    pass
            elif not self.fs.exists(key):
                self.fs.put_file(temp, key)
                return
            self._set_aside(key)
            self.fs.put_file(temp, key)
        except Exception as exc:
            raise classify(exc, f"cannot write {self._shown_key(key)}") from exc

    def _set_aside(self, key: str) -> None:
        """Copy an object no ledger line claims out of the way, instead of overwriting it."""
        self.fs.copy(key, f"{self.root}/{aside_name(PurePosixPath(key).name)}")

    def park(self, name: str, temp: Path) -> None:
        """Keep a paid-for file the store refused in the state directory (`parked/NAME`),
        for the next run to upload (`RemoteOutput.unpark`)."""
        target = self.state_dir / PARKED_DIR / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, target)

    def hold(self, record: Mapping[str, Any]) -> None:
        """Keep the ledger line of an item whose files are parked (`parked.jsonl`, fsynced):
        written to the ledger by the next run, once the files are in the store."""
        from ..ledger import LedgerWriter

        with LedgerWriter(self.state_dir / PARKED_LINES) as lines:
            lines.append(record)

    def sync(self) -> None:
        """Nothing: what the store confirmed is durable."""

    def open(self, name: str) -> BinaryIO:
        """An object, streamed (read from a thread that runs no event loop)."""
        key = self.key(name)
        try:
            fh: BinaryIO = self._call(self.fs.open, key, "rb", block_size=8 << 20)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise classify(exc, f"cannot read {self._shown_key(key)}") from exc
        return fh

    def read(self, name: str) -> bytes:
        """An object's bytes. FileNotFoundError if there is none; StorageError otherwise."""
        key = self.key(name)
        try:
            data: bytes = self._call(self.fs.cat_file, key)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise classify(exc, f"cannot read {self._shown_key(key)}") from exc
        return data

    def read_many(self, names: builtins.list[str]) -> builtins.list[bytes]:
        """Several objects' bytes, fetched at once, in the order given."""
        keys = [self.key(n) for n in names]
        try:
            found: dict[str, Any] = self._call(self.fs.cat, keys, on_error="return")
        except Exception as exc:
            raise classify(exc, f"cannot read {self.location}") from exc
        out = []
        for key in keys:
            data = found.get(key)
            if isinstance(data, BaseException):
                raise classify(data, f"cannot read {self._shown_key(key)}")
            out.append(bytes(data or b""))
        return out

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object (one ranged GET)."""
        key = self.key(name)
        try:
            data: bytes = self._call(self.fs.cat_file, key, start=start, end=end)
        except Exception as exc:
            raise classify(exc, f"cannot read {self._shown_key(key)}") from exc
        return data

    def write(self, name: str, data: bytes, *, create: bool = False, **kwargs: Any) -> Any:
        """Write an object whole (`create`: FileExistsError if there is one already; on a
        store without conditional writes, a look first). Returns the store's answer."""
        key = self.key(name)
        if create and not self.conditional:
            if self._call(self.fs.exists, key):
                raise FileExistsError(f"{self._shown_key(key)} exists")
            create = False
        mode = "create" if create else "overwrite"
        return self._call(self.fs.pipe_file, key, data, mode=mode, **kwargs)

    def info(self, name: str) -> dict[str, Any]:
        """An object's details (size, ETag...). FileNotFoundError if there is none."""
        details: dict[str, Any] = self._call(self.fs.info, self.key(name))
        return details

    def exists(self, name: str) -> bool:
        try:
            return bool(self._call(self.fs.exists, self.key(name)))
        except ValueError:
            return False

    def list(self, prefix: str) -> Iterator[str]:
        for name, _ in self.sizes(prefix):
            yield name

    def sizes(self, prefix: str) -> builtins.list[tuple[str, int]]:
        """The objects directly under `prefix/` (hidden ones left out), with their sizes."""
        try:
            names = self._call(self.fs.ls, self.key(prefix), detail=True)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise classify(exc, f"cannot list {self._shown_key(self.key(prefix))}") from exc
        found = []
        for entry in sorted(names, key=lambda e: str(e["name"])):
            base = PurePosixPath(str(entry["name"])).name
            if entry.get("type") == "file" and not base.startswith("."):
                found.append((f"{prefix}/{base}", int(entry.get("size") or 0)))
        return found

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call(self.fs.rm_file, self.key(name))

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    # -- helpers --

    def _shown_key(self, key: str) -> str:
        scheme = urlsplit(self.url).scheme
        return f"{scheme}://{key}"

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call a blocking fsspec method; from an event loop's thread, on another thread."""
        if _in_event_loop():
            return self._pool.submit(fn, *args, **kwargs).result()
        return fn(*args, **kwargs)


def classify(exc: BaseException, what: str) -> StorageError:
    """A store's error as the engine needs it (see the module docstring). The message is the
    store's own (its code and text), never a credential."""
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    message = f"{what}: {detail}"
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, _REFUSED) or _is_credentials_error(exc):
        return StoreRefused(message)
    if isinstance(exc, OSError) and exc.errno in _REJECTED_ERRNOS:
        return ObjectRejected(message)
    return StoreRefused(message)


def _is_credentials_error(exc: BaseException) -> bool:
    return type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError")


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = getattr(fs, "protocol", ())
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _in_event_loop() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def default_state_dir(url: str) -> Path:
    """Where a run on `url` keeps its local state unless `--state` says: a directory in the
    user's cache, named by a hash of the URL (so each output has its own)."""
    import hashlib  # loads OpenSSL (2 ms): only a bucket's run needs it

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    digest = hashlib.sha256(shown(url).rstrip("/").encode()).hexdigest()[:16]
    return Path(base) / "batchimg" / "state" / digest


def check_store(store: ObjectStore) -> None:
    """UsageError (exit 2, before anything is sent) unless the prefix takes an object and
    gives it back: credentials found, bucket there, writes allowed, endpoint reachable."""
    probe = f".batchimg-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    where = store.location
    try:
        store.write(probe, b"x")
        store.delete(probe)
    except Exception as exc:
        if _is_credentials_error(exc):
            raise UsageError(
                f"no credentials for {where}: set them as the storage library reads them (for "
                "S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or "
                "~/.aws/credentials; AWS_ENDPOINT_URL for an S3-compatible service)"
            ) from None
        if isinstance(exc, PermissionError):
            why = "access denied: check the credentials and the bucket's policy"
        elif isinstance(exc, FileNotFoundError):
            why = "no such bucket: create it first, or check the name"
        else:
            why = f"{type(exc).__name__}: {exc}"
        raise UsageError(f"cannot write to --out {where} ({why})") from None
