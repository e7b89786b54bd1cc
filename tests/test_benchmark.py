"""tools.benchmark: the table it prints and writes, with the load average it ran at."""

import json
import re
import subprocess
import sys

from conftest import REPO


def test_the_benchmark_warns_of_a_busy_machine():
    # In a process of its own: the tool defines flags the trainer's share (--steps).
    code = ("from tools import benchmark\n"
            "print(benchmark.load_warning('fc', 0.3, 0.9))\n"
            "print(benchmark.load_warning('small_cnn', 0.5, 2.25))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    quiet, busy = done.stdout.strip().splitlines()
    assert quiet == "None"
    assert "small_cnn was timed at a load average of 0.50 before and 2.25 after" in busy


def test_the_benchmark_times_sgd_and_an_aggregator_and_records_the_load(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "tools.benchmark", "--models=fc3",
         "--aggregators=mean,winsorized:4", "--steps=2", "--nojit", "--memory", "--batches=20",
         f"--json={out}"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["aggregator"] for r in rows] == ["mean", "winsorized"]
    for r in rows:
        assert r["step_seconds"] > 0 and r["load_before"] >= 0 and r["load_after"] >= 0
        assert r["peak_mb"] > 0  # each measured alone, from before its first step
    assert rows[0]["ratio_to_sgd"] == 1.0
    assert "fc 784-256-256-256-10: load average" in done.stdout


def test_the_input_benchmark_reads_each_workers_slice_both_ways(digits_dir):
    done = subprocess.run(
        [sys.executable, "-m", "tools.benchmark_input", f"--data_dir={digits_dir}",
         "--workers=2", "--batch_size=32", "--steps=5", "--streamed"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    opened, whole, part = done.stdout.strip().splitlines()
    # What opening reads is test_data_integrity's; here that it is reported.
    assert re.match(r"open: [1-9][\d,]* bytes read of the records' [1-9][\d,]* ", opened), opened
    assert whole.startswith("whole: 2 workers read 5 global batches of 32")
    assert "each decoding 160 examples and keeping 80" in whole
    assert "each decoding 80 examples and keeping 80" in part
    assert re.search(r"; [\d,]+ examples a CPU second$", part), part


def test_collective_bytes_counts_the_rules_factors_and_routes():
    """fc 784-2048-10 at 8 replicas: a dense layer's rule records its input and
    its output gradient, the bias its own copy of the latter, per example.
    The hidden kernel is gathered (784 x 2048 >= 2 x 8 x (784 + 2048)); the
    logits' (2048 x 10 < 2 x 8 x 2,058) and the biases (2,058 side by side: 17
    rows of 128, padded to 24) are exchanged."""
    from tools.collective_bytes import all_to_all_sent, ring_sent, routes_per_example, traffic
    params, routes = routes_per_example("fc", 8)
    assert params == 784 * 2048 + 2048 + 2048 * 10 + 10
    assert routes == {"factors": (784 + 2048) + (2048 + 10) + (2048 + 10),
                      "coordinates": 784 * 2048 + 2048 * 10 + 24 * 128,
                      "gathered": 784 + 2048, "exchanged": 2048 * 10 + 24 * 128}
    row = traffic(params=1000, routes={"factors": 10, "coordinates": 1000, "gathered": 6,
                                       "exchanged": 200}, batch=64, replicas=8)
    plain = ring_sent(4000, 8)
    assert row["plain_payload"] == 4000 and plain == 7000
    assert row["all_gathered_sent"] == plain + ring_sent(4 * 64 * 10, 8)
    assert row["all_exchanged_sent"] == plain + all_to_all_sent(4 * 8 * 1000, 8) == plain + 28000
    assert row["chosen_sent"] == plain + ring_sent(4 * 64 * 6, 8) + all_to_all_sent(4 * 8 * 200, 8)


def test_the_tile_benchmark_times_the_tiles_and_checks_them_against_numpy():
    done = subprocess.run(
        [sys.executable, "-m", "tools.benchmark_tile", "--ways=tiles,sort", "--batches=12,30",
         "--c=2", "--calls=1"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [("tiles", "12"), ("tiles", "30"), ("sort", "12"),
                                            ("sort", "30")]
    assert all(r[-1] == "True" for r in rows), done.stdout


def test_replica_parts_takes_a_part_out_while_tracing_and_puts_it_back():
    import numpy as np
    import tensorflow as tf

    from cg_tf.robust import collectives, tiled
    from cg_tf.robust.aggregators import Winsorized
    from cg_tf.robust.layer_rules import Stacked
    from tools.replica_parts import without
    parts = (tiled.share_of_whole, tiled.share_of_received, collectives.Collectives.gather,
             collectives.Collectives.exchange)
    values = [Stacked(tf.constant(np.arange(12, dtype=np.float32).reshape(4, 3)))]
    with without("statistics"):
        assert np.all(tiled.aggregate(values, Winsorized(c=1), [tf.zeros([3])])[0].numpy() == 0)
        assert tiled.share_of_received is not parts[1]
    with without("collective"):
        assert collectives.Collectives.gather is not parts[2]
        assert collectives.Collectives.exchange is not parts[3]
    assert (tiled.share_of_whole, tiled.share_of_received, collectives.Collectives.gather,
            collectives.Collectives.exchange) == parts
    np.testing.assert_allclose(tiled.aggregate(values, Winsorized(c=1), [tf.zeros([3])])[0],
                               [4.5, 5.5, 6.5])


def test_replica_parts_times_each_variant(tmp_path):
    out = tmp_path / "parts.json"
    done = subprocess.run(
        [sys.executable, "-m", "tools.replica_parts", "--model=fc3", "--replicas=2",
         "--rounds=1", f"--json={out}"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["plain SGD", "whole", "no collective",
                                            "no statistics", "neither"]
    assert all(r["cpu_ms"] > 0 and r["replicas"] == 2 for r in rows)
    assert "fc3, winsorized:4, 2 replicas" in done.stdout
