"""One filesystem factory for everything that touches storage (datasets, manifests, checkpoints).

`filesystems(uri, options)` returns a pyarrow filesystem, an fsspec filesystem and the path inside
them, matching each other, for local paths, ``file://``, ``s3://`` (AWS or any S3-compatible
endpoint: MinIO, moto, Ceph) and ``gs://`` (when gcsfs is installed).

Credentials are never part of the options or of any config: they come from the environment
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN), from a named profile
(~/.aws/credentials), or from the platform's own identity (instance profile, workload identity)
through the default provider chain.
"""
from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from vis4mer.datasets.errors import UserError


class StorageError(UserError):
    """A URI or storage setting that cannot work: one line naming the URI and what was expected."""


@dataclass
class StorageOptions:
    endpoint_url: str | None = None  # S3-compatible endpoint; default: AWS_ENDPOINT_URL or AWS
    region: str | None = None  # default: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1
    profile: str | None = None  # named credentials profile
    path_style: bool = False  # path-style addressing (most S3-compatible servers)
    anonymous: bool = False  # unsigned requests (public buckets)


@dataclass
class Resolved:
    scheme: str  # "file" | "s3" | "gs"
    path: str  # path inside the filesystems (bucket/key for object stores)
    pa: pafs.FileSystem
    make_fs: Callable[[], Any] = field(repr=False, default=None)  # the fsspec filesystem, made on first use

    @functools.cached_property
    def fs(self):
        """The matching fsspec filesystem (listing, text files). Made on first use: reading shards needs
        only pyarrow, and a bare GPU machine may not have fsspec."""
        return self.make_fs()

    def uri(self, *parts: str) -> str:
        p = "/".join([self.path.rstrip("/"), *parts]) if parts else self.path
        return p if self.scheme == "file" else f"{self.scheme}://{p}"

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])


def split_uri(uri: str) -> tuple[str, str]:
    if not uri:
        raise StorageError("empty URI: expected a local path, file://, s3:// or gs:// URI")
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and uri[1:3] == ":\\"):
        path = parsed.path if scheme == "file" else uri
        return "file", os.path.abspath(os.path.expanduser(path))
    if scheme in ("s3", "s3a", "gs", "gcs"):
        if not parsed.netloc:
            raise StorageError(f"{uri}: no bucket: expected {scheme}://BUCKET/PREFIX")
        return ("s3" if scheme.startswith("s3") else "gs"), f"{parsed.netloc}{parsed.path}".rstrip("/")
    raise StorageError(f"{uri}: unsupported scheme {scheme!r}: expected a local path, file://, s3:// or gs://")


def _aws_credentials(opts: StorageOptions) -> dict:
    """Explicit credentials from a profile or the environment; {} lets the default chain decide."""
    if opts.anonymous:
        return {}
    if opts.profile:
        import botocore.session

        try:
            creds = botocore.session.Session(profile=opts.profile).get_credentials()
        except Exception as e:  # ProfileNotFound and friends
            raise StorageError(f"credentials profile {opts.profile!r}: {e}") from None
        if creds is None:
            raise StorageError(f"credentials profile {opts.profile!r} has no credentials")
        frozen = creds.get_frozen_credentials()
        return {"key": frozen.access_key, "secret": frozen.secret_key, "token": frozen.token}
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return {"key": key, "secret": secret, "token": os.environ.get("AWS_SESSION_TOKEN")}
    return {}


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with vis4mer's retry strategy, kept when pickled.

    pyarrow drops `retry_strategy` when an S3FileSystem is pickled, and Ray pickles the run's
    storage filesystem into the Train controller and workers: without this, their checkpoint writes
    fell back to 3 quick attempts and a 4-s endpoint outage ended the run."""

    def __init__(self, **kwargs):
        self._vis4mer_kwargs = kwargs
        super().__init__(**kwargs, retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=PYARROW_S3_ATTEMPTS))

    def __reduce__(self):
        return RetryingS3FileSystem._rebuild, (self._vis4mer_kwargs,)

    @staticmethod
    def _rebuild(kwargs: dict) -> RetryingS3FileSystem:
        return RetryingS3FileSystem(**kwargs)


PYARROW_S3_ATTEMPTS = 10  # waits 50 ms, 100 ms, ... 6.4 s between tries: ~13 s in all
BOTOCORE_S3_ATTEMPTS = 8


def filesystems(uri: str, options: StorageOptions | None = None) -> Resolved:
    opts = options or StorageOptions()
    scheme, path = split_uri(uri)
    if scheme == "file":
        return Resolved("file", path, pafs.LocalFileSystem(), functools.partial(_fsspec, "file"))
    if scheme == "s3":
        endpoint = opts.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = opts.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        creds = _aws_credentials(opts)
        # An endpoint that drops out for seconds (a restart, a network blip) must not end a run: both
        # clients retry connection errors and 5xx with exponential backoff (pyarrow: 25 ms doubling
        # over 10 attempts, ~13 s of waiting in all; botocore standard mode: 8 attempts, jittered,
        # each wait capped at 20 s). Auth and not-found errors are not retried.
        pa_kwargs = dict(region=region, anonymous=opts.anonymous, force_virtual_addressing=False,
                         connect_timeout=5, request_timeout=60)
        s3_kwargs: dict = dict(anon=opts.anonymous, client_kwargs={"region_name": region},
                               config_kwargs={"retries": {"max_attempts": BOTOCORE_S3_ATTEMPTS, "mode": "standard"},
                                              "connect_timeout": 5})
        if endpoint:
            u = urlparse(endpoint)
            if u.scheme not in ("http", "https") or not u.netloc:
                raise StorageError(f"endpoint_url {endpoint!r}: expected http(s)://HOST[:PORT]")
            pa_kwargs.update(endpoint_override=u.netloc, scheme=u.scheme)
            s3_kwargs["endpoint_url"] = endpoint
        if opts.path_style or endpoint:
            s3_kwargs["config_kwargs"]["s3"] = {"addressing_style": "path"}
        if creds:
            pa_kwargs.update(access_key=creds["key"], secret_key=creds["secret"], session_token=creds["token"])
            s3_kwargs.update(key=creds["key"], secret=creds["secret"], token=creds["token"])
        return Resolved("s3", path, RetryingS3FileSystem(**pa_kwargs), functools.partial(_s3fs, s3_kwargs))
    try:
        import gcsfs
    except ImportError:
        raise StorageError(f"{uri}: gs:// needs gcsfs: pip install 'vis4mer[gcs]'") from None
    fs = gcsfs.GCSFileSystem(token="anon" if opts.anonymous else None)
    return Resolved("gs", path, pafs.PyFileSystem(pafs.FSSpecHandler(fs)), lambda: fs)


def safe_relative(path: str, what: str, error: type[Exception] = StorageError) -> str:
    """A path taken from data (a manifest's shard, a label file's video id), checked before it is joined
    under its root: relative, '/'-separated, normalised (no '', '.' or '..' part) and without a scheme
    or drive, so that it stays inside the root. Returns it unchanged; else raises `error`."""
    parts = path.split("/") if isinstance(path, str) else []
    if (not parts or any(p in ("", ".", "..") for p in parts) or "\\" in path or "\x00" in path
            or "://" in path or ":" in parts[0] or path != path.strip()):
        raise error(f"{what} {path!r:.120}: expected a relative path inside the dataset (no '..', no leading '/', "
                    "no scheme)")
    return path


def read_text(path: str | os.PathLike, what: str = "file", *, fs=None, where: str | None = None,
              error: type[Exception] = StorageError) -> str:
    """A text file's contents: a local path, or `path` on the fsspec filesystem `fs`. One `error` naming
    `where` (default: the path) when it is missing, a folder or not UTF-8 text, or (`fs`) when the
    storage fails; `what` says what it should be ("label file"). A byte-order mark (Excel, Notepad)
    is not content."""
    where = str(path) if where is None else where
    try:
        if fs is None:
            with open(path, encoding="utf-8-sig") as f:
                return f.read()
        with fs.open(path, "r", encoding="utf-8-sig") as f:
            return f.read()
    except FileNotFoundError:
        raise error(f"{where}: no such {what}") from None
    except IsADirectoryError:
        raise error(f"{where}: is a folder; expected a {what}") from None
    except UnicodeDecodeError:
        raise error(f"{where}: not a text file (expected a UTF-8 {what})") from None
    except OSError as e:
        raise error(f"{where}: cannot read ({e.strerror or type(e).__name__})") from None
    except Exception as e:  # an object store's own errors (botocore, gcsfs): credentials, bucket, network
        if fs is None:
            raise
        raise StorageError(describe_error(where, e)) from None


def check_local_target(path: str, uri: str) -> None:
    """A local folder that can be written as a dataset: a folder (or a symlink to one), or nothing yet
    under a folder; never a file, a dangling symlink, a symlink loop or anything else that is there
    but not a folder (os.path.lexists: an entry counts whether or not its target exists)."""
    p = os.path.abspath(path)
    if os.path.lexists(p) and not os.path.isdir(p):
        raise StorageError(f"{uri}: {_not_a_folder(p)}: expected a folder (or a path that does not exist yet)")
    parent = os.path.dirname(p)
    while parent and not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise StorageError(f"{uri}: {parent} {_not_a_folder(parent)}: expected a folder there")
    if parent and not os.access(parent if not os.path.exists(p) else p, os.W_OK):
        raise StorageError(f"{uri}: not writable (permission denied on {parent if not os.path.exists(p) else p})")


def _not_a_folder(p: str) -> str:
    """What the existing entry `p`, which is not a folder, is."""
    if os.path.islink(p):
        try:
            target = os.readlink(p)
        except OSError:
            target = "?"
        if os.path.exists(p):
            return f"is a symlink to {target!r:.200}, which is not a folder"
        try:
            os.stat(p)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return "is a symlink loop"
        return f"is a dangling symlink (to {target!r:.200}, which does not exist)"
    return "is a file" if os.path.isfile(p) else "is not a folder (a device, pipe or socket)"


def _fsspec(protocol: str):
    import fsspec

    return fsspec.filesystem(protocol)


def _s3fs(kwargs: dict):
    import s3fs

    return s3fs.S3FileSystem(**kwargs)


def storage_failure(uri: str, e: BaseException) -> str | None:
    """A one-line reason, naming the URI, when `e` says the storage failed (credentials, bucket, a
    missing object, the network); None when it says something else (the data, for one)."""
    text = str(e)
    low = text.lower().replace("_", "")  # pyarrow says ACCESS_DENIED, botocore AccessDenied
    if "accessdenied" in low or "invalidaccesskeyid" in low or "signaturedoesnotmatch" in low or "forbidden" in low:
        return f"{uri}: access denied: check the credentials (environment or profile) for this bucket"
    if "nosuchbucket" in low or "bucket does not exist" in low:
        return f"{uri}: the bucket does not exist"
    if isinstance(e, FileNotFoundError) or any(w in low for w in ("nosuchkey", "notfound", "not found",
                                                                  "path does not exist")):
        return f"{uri}: not found"
    if "could not connect" in low or "connection refused" in low or "timed out" in low or "curl" in low:
        return f"{uri}: cannot reach the storage endpoint ({text.splitlines()[0][:200]})"
    return None


def describe_error(uri: str, e: BaseException) -> str:
    """A one-line reason for a storage failure (credentials, bucket, network), naming the URI."""
    text = str(e)
    return storage_failure(uri, e) or f"{uri}: {text.splitlines()[0][:300] if text else type(e).__name__}"
