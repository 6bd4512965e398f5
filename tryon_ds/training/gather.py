"""Whole-model state dicts assembled on rank 0 a bucket at a time (the raw weights under ZeRO-3, the EMA at any
stage): no rank ever holds more than one bucket beyond its own part, and a caller that writes or loads each
part as it comes (a checkpoint's EMA, a preview's weights) never holds the whole dict either."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def in_buckets(items: Iterable[T], numel: Callable[[T], int], bucket_numel: int) -> Iterator[list[T]]:
    """``items`` in order, cut into runs whose ``numel`` adds up to ``bucket_numel`` (the last one less)."""
    bucket, size = [], 0
    for item in items:
        bucket.append(item)
        size += numel(item)
        if size >= bucket_numel:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def streamed(is_main: bool, parts: Iterator[dict], into: Callable[[dict], None] | None = None) -> dict | None:
    """Drive ``parts`` (every rank: the collectives are inside it). Rank 0 hands each part to ``into`` as it
    comes and returns None, or without ``into`` returns them as one dict; the other ranks return None."""
    out: dict = {}
    for part in parts:
        if is_main and part:
            (into or out.update)(part)
    return out if is_main and into is None else None
