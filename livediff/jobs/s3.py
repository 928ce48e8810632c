"""`S3Storage`: the jobs' and recordings' files in S3-compatible object storage (`--jobs-storage s3://bucket/prefix`).

Objects are `<prefix>/<job or recording id>/<name>` (`input`, `result.mp4`, `output.mp4`, `recording.json`).
This machine's folder (`<state folder>/jobs/`) is the working copy: an upload streams there as it arrives
and is put in the bucket once complete; a result is put in the bucket when its encoder finished, before the
job is complete; a file asked for that is not here (another replica made it, or the folder was cleared) is
brought back from the bucket, then served from disk with range requests.

Transfers go through boto3's transfer manager: a file over `MULTIPART_BYTES` is sent as a multipart upload
(the S3 API's CreateMultipartUpload / UploadPart / CompleteMultipartUpload) in parts of that size.
The endpoint and credentials are boto3's own settings: `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) for a
server that is not AWS, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, or a profile.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from livediff.errors import ConfigError
from livediff.jobs.storage import LocalStorage, Upload

log = logging.getLogger(__name__)

MULTIPART_BYTES = 8 * 1024 * 1024
"""Files over this go up as multipart uploads, in parts of this size (S3's smallest part is 5 MiB)."""


def parse_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix"); `ConfigError` for anything else."""
    if not url.startswith("s3://"):
        raise ConfigError(f"jobs storage must be a folder or s3://bucket/prefix, got {url!r}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ConfigError(f"jobs storage {url!r} names no bucket: s3://bucket/prefix")
    return bucket, prefix.strip("/")


class S3Storage(LocalStorage):
    """`LocalStorage` at `cache` as the working copy, with every finished file kept in `bucket` under `prefix`."""

    def __init__(self, url: str, cache: Path, client: Any = None) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig

        super().__init__(cache)
        self.url = url
        self.bucket, self.prefix = parse_url(url)
        self.client = client or boto3.client("s3")
        self.transfer = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)

    def key(self, job_id: str, name: str) -> str:
        self.folder(job_id)  # checks the id
        return "/".join(part for part in (self.prefix, job_id, name) if part)

    def upload(self, job_id: str, limit: int) -> Upload:
        upload = super().upload(job_id, limit)
        upload.on_commit = lambda: self.store(job_id, "input")
        return upload

    def store(self, job_id: str, name: str) -> None:
        """Put the local file `name` of `job_id` in the bucket (multipart when large); boto3's errors raise."""
        path = self.folder(job_id) / name
        self.client.upload_file(str(path), self.bucket, self.key(job_id, name), Config=self.transfer)

    def fetch(self, job_id: str, name: str) -> Path | None:
        from botocore.exceptions import ClientError

        path = super().fetch(job_id, name)
        if path is not None:
            return path
        path = self.folder(job_id) / name
        part = path.with_name(f"{name}.{os.getpid()}.fetch")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self.key(job_id, name), str(part), Config=self.transfer)
        except ClientError as exc:
            part.unlink(missing_ok=True)
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        os.replace(part, path)
        return path

    def remove(self, job_id: str) -> None:
        super().remove(job_id)
        prefix = self.key(job_id, "") + "/"
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if keys:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})
        except Exception:  # noqa: BLE001 - an unused upload left in the bucket is not worth failing a request
            log.warning("jobs storage: could not remove %s from %s", prefix, self.url, exc_info=True)

    def ids(self, prefix: str) -> set[str]:
        """The ids starting with `prefix` in the bucket (the folders under this storage's prefix, as S3's
        ListObjectsV2 with a `/` delimiter gives them), and those in the working copy. boto3's errors raise."""
        found = super().ids(prefix)
        base = self.prefix + "/" if self.prefix else ""
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base + prefix, Delimiter="/"
        ):
            for common in page.get("CommonPrefixes", []):
                name = common["Prefix"][len(base) :].rstrip("/")
                if name.replace("_", "").isalnum():
                    found.add(name)
        return found


def make_storage(storage: Path | None, url: str, state_dir: Path) -> LocalStorage:
    """The storage the settings name: `url` (s3://) with `storage` or `<state>/jobs` as its working copy, else
    the local folder."""
    cache = storage or state_dir / "jobs"
    return S3Storage(url, cache) if url else LocalStorage(cache)
