"""Shards from a store that is slow and fails: http:// and pipe: specs against a real HTTP server on the
loopback (tools/bench/shard_server.py) with latency and faults. A failing shard is read again a bounded
number of times, going on where it broke; then it is skipped and counted; a hung one times out; a training
run on 2 ranks goes through all of it to the end."""
import json
from pathlib import Path

import pytest
import webdataset as wds

from conftest import command, run

from tryon_ds.config import DataConfig
from tryon_ds.data.pipeline import RETRIED, ValDataset
from tools.bench.shard_server import ShardServer

POLICY = DataConfig(shard_timeout_s=1.5, shard_retries=2, shard_retry_wait_s=0.05)


def _keys(urls):
    return [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


def _read(urls, data=POLICY):
    dataset = ValDataset(urls, 18, ("ca",), lambda sample: sample["key"], data=data)
    return list(dataset), dataset.counter.counts


def test_retries_go_on_where_the_shard_broke_and_a_shard_that_keeps_failing_is_skipped(shards):
    names = sorted(p.name for p in Path(shards).glob("train-*.tar"))[:4]
    local = {n: _keys([str(Path(shards) / n)]) for n in names}
    faults = {names[0]: ["drop"], names[1]: ["503", "503"], names[2]: ["hang"] * 3, names[3]: ["503"] * 3}
    with ShardServer(shards, latency_s=0.05, faults=faults) as server:
        keys, counts = _read([server.url(n) for n in names])
        assert server.requests[names[0]] == 2 and server.requests[names[2]] == 3
    assert sorted(keys) == sorted(local[names[0]] + local[names[1]])  # each sample once: none lost, none twice
    retried = {r: n for r, n in counts.items() if r.startswith(RETRIED)}
    assert retried == {f"{RETRIED}{server.url(names[0])}": 1, f"{RETRIED}{server.url(names[1])}": 2,
                       f"{RETRIED}{server.url(names[2])}": 2, f"{RETRIED}{server.url(names[3])}": 2}
    unreadable = [r for r in counts if r.startswith("unreadable shard")]
    assert len(unreadable) == 2
    assert any(names[2] in r and "no data for 1.5 s (data.shard_timeout_s)" in r for r in unreadable)
    assert any(names[3] in r and "error: 503" in r for r in unreadable)


def test_pipe_specs_are_read_and_their_failures_counted(shards):
    name = sorted(Path(shards).glob("train-*.tar"))[0]
    keys, counts = _read([f"pipe:cat {name}", "pipe:echo 'AccessDenied' >&2; exit 1"])
    assert sorted(keys) == sorted(_keys([str(name)]))
    assert [r for r in counts if r.startswith("unreadable shard")] == [
        "unreadable shard pipe:echo 'AccessDenied' >&2; exit 1: ShardReadError: pipe:echo 'AccessDenied' >&2; "
        "exit 1: exited with status 1: AccessDenied"]


@pytest.mark.slow
def test_training_from_a_slow_failing_server_on_two_ranks_runs_to_the_end(shards, tmp_path):
    names = sorted(p.name for p in Path(shards).glob("train-*.tar"))
    faults = {names[0]: ["drop", "503"], names[1]: ["503"] * 100}  # the second one never comes back
    with ShardServer(shards, latency_s=0.05, bandwidth=4e6, faults=faults) as server:
        urls = json.dumps([server.url(n) for n in names])
        r = run(command(tmp_path, shards, steps=6, extra=[
            "--set", f"data.train_shards={urls}", "--set", "data.shard_retries=2",
            "--set", "data.shard_retry_wait_s=0.05", "--set", "data.shard_timeout_s=5"], launcher="torchrun"), timeout=300)
    assert "shard read(s) retried" in r.stdout and f"unreadable shard {server.url(names[1])}" in r.stdout
    entries = [json.loads(line) for line in (tmp_path / "out" / "metrics_unet1.jsonl").read_text().splitlines()]
    assert max(e.get("data/shard_retries", 0) for e in entries) >= 1
    assert sorted(e["step"] for e in entries if "train/loss" in e) == [1, 2, 3, 4, 5, 6]
