"""Reading a shard wherever it lives, and living with a store that is slow and sometimes fails.

A shard spec is a local path, an ``http(s)://`` URL (read by ``curl``, as WebDataset's own opener does) or a
``pipe:`` command whose standard output is the tar (``pipe:aws s3 cp s3://bucket/train-000000.tar -``,
``pipe:gsutil cat gs://...``). Reads of the last two are bounded and retried:

- a read that brings no byte for ``data.shard_timeout_s`` fails (a server that accepted the connection and
  never answers would otherwise hold the loader worker, and so the rank, forever);
- a command that ends with a non-zero status (curl's for an HTTP error such as 503, a connection dropped
  mid-shard) fails, with the tail of its error output, even if part of the tar came through;
- a failed shard is read again up to ``data.shard_retries`` times, after 1, 2, 4... x
  ``data.shard_retry_wait_s``; samples already delivered from it are skipped on the way, so the stream goes
  on exactly where it broke. Each retry is counted (and logged by the trainer);
- a shard still failing after that is skipped and counted as unreadable; training goes on with the others
  (the stream raises only when nothing at all can be read, see pipeline.SkipCounter).

Tars are parsed with WebDataset's own iterators, so the samples are exactly those its stock reader yields.
"""
from __future__ import annotations

import io
import os
import select
import shlex
import signal
import subprocess
import tarfile
import tempfile
import time
from typing import Iterable, Iterator

from webdataset.tariterators import group_by_keys, tar_file_iterator


class ShardReadError(IOError):
    pass


def command_for(url: str, timeout_s: float) -> str | None:
    """The shell command that streams ``url``; None for a local file."""
    if url.startswith("pipe:"):
        return url[len("pipe:"):]
    if url.startswith(("http://", "https://")):
        # --fail: an HTTP error is a non-zero exit, not an error page parsed as a tar
        return (f"curl --fail --silent --show-error --location --connect-timeout {timeout_s:g} "
                f"{shlex.quote(url)}")
    return None


class _CommandStream(io.RawIOBase):
    """A command's standard output, read with a timeout per read; its exit status is checked at the end."""

    def __init__(self, url: str, command: str, timeout_s: float):
        self.url, self.timeout_s = url, timeout_s
        self.errors = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command must never block on it
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self.errors,
                                     start_new_session=True)
        self.fd = self.proc.stdout.fileno()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        ready, _, _ = select.select([self.fd], [], [], self.timeout_s)
        if not ready:
            self._kill()
            raise ShardReadError(f"{self.url}: no data for {self.timeout_s:g} s (data.shard_timeout_s)")
        data = os.read(self.fd, len(buffer))
        if not data:
            status = self.proc.wait()
            if status != 0:
                self.errors.seek(0)
                tail = self.errors.read()[-300:].decode(errors="replace").strip()
                raise ShardReadError(f"{self.url}: exited with status {status}" + (f": {tail}" if tail else ""))
        buffer[:len(data)] = data
        return len(data)

    def _kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def close(self) -> None:
        if not self.closed:
            self._kill()
            self.proc.stdout.close()
            self.errors.close()
        super().close()


def open_shard(url: str, timeout_s: float) -> io.BufferedReader:
    command = command_for(url, timeout_s)
    if command is None:
        return open(url, "rb")
    return io.BufferedReader(_CommandStream(url, command, timeout_s), buffer_size=1 << 20)


def shard_samples(url: str, data, counter) -> Iterator[dict]:
    """The samples of one shard (``__key__``, ``__url__`` and one entry per member), read under the retry
    policy of ``data`` (the DataConfig); ``counter`` (pipeline.SkipCounter) hears of retries and failures."""
    delivered = 0
    # A local file that fails to read will fail again: only a store gets another try.
    retries = data.shard_retries if command_for(url, data.shard_timeout_s) is not None else 0
    for attempt in range(retries + 1):
        try:
            with open_shard(url, data.shard_timeout_s) as stream:
                files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
                for index, sample in enumerate(group_by_keys(files)):
                    if index < delivered:
                        continue
                    delivered += 1
                    yield sample
            return
        except (OSError, tarfile.TarError, ValueError) as err:  # ShardReadError is an OSError
            if attempt == retries:
                counter.shard_failed(url, err, attempt + 1)
                return
            counter.shard_retried(url, err)
            time.sleep(data.shard_retry_wait_s * 2 ** attempt)


def read_shards(data, counter):
    """A WebDataset pipeline stage: {"url": ...} items in, samples out."""
    def stage(items: Iterable[dict]) -> Iterator[dict]:
        for item in items:
            yield from shard_samples(item["url"], data, counter)
    return stage
