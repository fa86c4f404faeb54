"""The data-loader benchmark runs end to end on a tiny generated set and reports positive figures."""

from __future__ import annotations

import json

import pytest

from sgm.benchmarks.data_loader import main, make_jpeg_shards


@pytest.mark.parametrize("draft", [True, False])
def test_benchmark_reports_positive_figures(tmp_path, capsys, draft) -> None:
    shards = make_jpeg_shards(tmp_path / "jpeg", num_shards=2, per_shard=3, sizes=((96, 128), (128, 96), (80, 80)))
    out = tmp_path / "bench.json"
    argv = [
        "--shards",
        *shards,
        "--resolution",
        "64",
        "--workers",
        "1",
        "--batches",
        "2",
        "--batch-size",
        "2",
        "--repeats",
        "1",
        "--latent-samples",
        "16",
        "--work-dir",
        str(tmp_path),
        "--json",
        str(out),
        *([] if draft else ["--no-draft"]),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "overhead" in printed and "ratio" in printed and "samples/cpu-s" in printed
    assert ("draft decoding" in printed) == draft
    results = json.loads(out.read_text())
    assert results["draft_decode"] == draft
    assert [(r["resolution"], r["buckets"]) for r in results["jpeg"]] == [(64, "square"), (64, "multi-aspect")]
    for row in results["jpeg"]:
        assert row["images_per_cpu_s"] > 0 and row["plain_images_per_cpu_s"] > 0 and row["images_per_s_per_worker"] > 0
        assert row["ratio"] > 0
    assert [r["text_embeddings"] for r in results["latents"]] == [False, True]
    assert all(r["samples_per_cpu_s"] > 0 and r["samples_per_s"] > 0 for r in results["latents"])
