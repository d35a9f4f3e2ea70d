"""`file:///abs/path`: objects as files under one root directory (local disk or an NFS mount)."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from personalize.adapters.store.base import ObjectStore, check_key, check_prefix, checksum_of, verify
from personalize.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable

_TMP_PREFIX = ".tmp-"  # hidden: no valid key starts with '.', so a temp file is never listed


class FileStore(ObjectStore):
    """Objects under `root`, one file per key. Writes are atomic (temp file in the same folder,
    fsync, os.replace); a key that would resolve outside `root` (through a symlink) is refused."""

    def __init__(self, root: str | Path) -> None:
        if not Path(root).is_absolute():
            raise InvalidArgument(f"file store root must be an absolute path, got {str(root)!r}")
        with _translate_os_errors(str(root)):
            Path(root).mkdir(parents=True, exist_ok=True)
        self._root = os.path.realpath(root)

    @property
    def root(self) -> Path:
        """The directory holding every object (symlinks resolved)."""
        return Path(self._root)

    @property
    def url(self) -> str:
        return Path(self._root).as_uri()

    def put(self, key: str, data: bytes) -> str:
        path = self._path(key)
        with _translate_os_errors(key):
            fd, tmp = self._temp_file(path.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            _fsync_dir(path.parent)  # makes the rename itself durable
        return checksum_of(data)

    def get(self, key: str, checksum: str | None = None) -> bytes:
        path = self._path(key)
        try:
            with _translate_os_errors(key, missing_ok=True):
                data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"object {key!r} not found in {self.url}") from None
        return verify(key, data, checksum)

    def exists(self, key: str) -> bool:
        path = self._path(key)
        with _translate_os_errors(key):
            return path.is_file()

    def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            with _translate_os_errors(key, missing_ok=True):
                path.unlink()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return False
        self._prune_empty_dirs(path.parent)
        return True

    def list(self, prefix: str) -> list[str]:
        check_prefix(prefix)
        folder = prefix.rpartition("/")[0]  # deepest folder every matching key lies under
        top = os.path.join(self._root, *folder.split("/")) if folder else self._root
        keys: list[str] = []
        with _translate_os_errors(prefix):
            for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                rel = os.path.relpath(dirpath, self._root)
                base = "" if rel == "." else rel.replace(os.sep, "/") + "/"
                keys.extend(
                    base + name for name in filenames if not name.startswith(".") and (base + name).startswith(prefix)
                )
        return sorted(keys)

    def _path(self, key: str) -> Path:
        """The file for `key`, refusing any that resolves outside the root."""
        path = os.path.join(self._root, *check_key(key).split("/"))
        if not os.path.realpath(path).startswith(self._root + os.sep):
            raise InvalidArgument(f"object key {key!r} resolves outside the store root")
        return Path(path)

    def _temp_file(self, folder: Path) -> tuple[int, str]:
        """A new hidden temp file in `folder`, creating the folder (again, if a delete raced us)."""
        for _ in range(5):
            folder.mkdir(parents=True, exist_ok=True)
            try:
                return tempfile.mkstemp(dir=folder, prefix=_TMP_PREFIX)
            except FileNotFoundError:  # a concurrent delete pruned the empty folder
                continue
        raise Unavailable(f"could not create a file in {folder}: it keeps disappearing")

    def _prune_empty_dirs(self, folder: Path) -> None:
        """Remove now-empty folders between `folder` and the root (a deleted user leaves no trace)."""
        root = Path(self._root)
        while folder != root and root in folder.parents:
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone): stop here
                return
            folder = folder.parent


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _translate_os_errors(what: str, missing_ok: bool = False) -> Iterator[None]:
    """Map disk failures to domain errors; with `missing_ok`, "no such file" passes through."""
    try:
        yield
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        if missing_ok:
            raise
        if isinstance(exc, FileNotFoundError):
            raise Unavailable(f"file store failed on {what!r}: a folder vanished (is the mount gone?)") from None
        raise InvalidArgument(f"object key {what!r} collides with a folder of other keys") from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted(f"file store is full writing {what!r}: {exc.strerror}") from exc
        raise Unavailable(f"file store failed on {what!r}: {exc}") from exc
