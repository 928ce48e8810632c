"""Where a job's files live: its upload and its result, under one folder per job.

`LocalStorage` keeps them on this machine's disk (the default: `<state folder>/jobs/`). Uploads are
written as they arrive, chunk by chunk, to a part file that becomes the input only when complete.
`livediff.jobs.s3.S3Storage` keeps them in S3-compatible object storage (`--jobs-storage s3://...`), with
this machine's folder as its working copy: `store` puts a finished file there, `fetch` brings one back.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path


class TooLarge(Exception):
    """An upload went over its byte limit while streaming (answered 413; the part written so far is removed)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the file is over the limit of {limit} bytes")
        self.limit = limit


class Upload:
    """A file being received: `write` chunks (counted and hashed), then `commit` or `abort`."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.part = path.with_name(path.name + ".part")
        self.limit = limit
        self.size = 0
        self.sha256 = hashlib.sha256()
        self._file = open(self.part, "wb")  # noqa: SIM115 - closed by commit/abort
        self.on_commit: Callable[[], None] | None = None
        """Runs once the file is in place (S3 storage: puts it in the bucket)."""

    def write(self, chunk: bytes) -> None:
        """Append `chunk`; `TooLarge` (and the part file removed) once past the limit."""
        self.size += len(chunk)
        if self.size > self.limit:
            self.abort()
            raise TooLarge(self.limit)
        self.sha256.update(chunk)
        self._file.write(chunk)

    def commit(self) -> None:
        self._file.close()
        os.replace(self.part, self.path)
        if self.on_commit is not None:
            self.on_commit()

    def abort(self) -> None:
        self._file.close()
        self.part.unlink(missing_ok=True)


class LocalStorage:
    """Job files in `root/<job id>/`: `input` (the upload as sent) and `result.mp4`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def folder(self, job_id: str) -> Path:
        if not job_id.replace("_", "").isalnum():  # ids are made here; never a path from a request
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / job_id

    def upload(self, job_id: str, limit: int) -> Upload:
        folder = self.folder(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        return Upload(folder / "input", limit)

    def input_path(self, job_id: str) -> Path:
        return self.folder(job_id) / "input"

    def result_path(self, job_id: str) -> Path:
        return self.folder(job_id) / "result.mp4"

    def store(self, job_id: str, name: str) -> None:
        """Keep the finished file `name` of `job_id` where the storage keeps files (here: it already is)."""

    def fetch(self, job_id: str, name: str) -> Path | None:
        """The file `name` of `job_id` on this machine's disk (brought back from the storage when it keeps
        files elsewhere), or None when it is not stored. Blocks: call off the event loop."""
        path = self.folder(job_id) / name
        return path if path.is_file() else None

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.folder(job_id), ignore_errors=True)

    def ids(self, prefix: str) -> set[str]:
        """The ids starting with `prefix` (`rec_`) that have files here. Blocks: call off the event loop."""
        return {folder.name for folder in self.root.glob(f"{prefix}*") if folder.is_dir()}
