"""The engine benchmark's report: table rows and RESULTS.md appends that keep other sections."""

from __future__ import annotations

from linewatch.benchmark import RESULTS_HEADING, append_results, format_table, summarize_rows


def test_table_compares_with_torch_eager_of_the_same_model_and_batch():
    eager = {"model": "m", "backend": "torch-eager", "ok": True, "peak_rss_mb": 300.0,
             "rows": summarize_rows([{"batch": 1, "lat_s": [0.1, 0.1]}, {"batch": 4, "lat_s": [0.2]}])}
    ort = {"model": "m", "backend": "onnxruntime", "ok": True, "peak_rss_mb": 310.0,
           "rows": summarize_rows([{"batch": 1, "lat_s": [0.05]}, {"batch": 1, "lat_s": [0.05]},
                                   {"batch": 4, "lat_s": [0.1]}])}
    trt = {"model": "m", "backend": "tensorrt", "ok": False, "error": "no GPU"}
    assert ort["rows"][0] == {"batch": 1, "fps": 20.0, "calls": 2, "p50_ms": 50.0, "p99_ms": 50.0}
    lines = format_table([eager, ort, trt])
    assert lines[2].endswith("| 1.00x |") and "| 2.00x |" in lines[4] and "| 2.00x |" in lines[5]
    assert "not run: no GPU" in lines[-1]
    assert "| 50.0 (~max) | 2 |" in lines[4]  # the sample count shows; a p99 of 2 calls says it is the max


def test_append_keeps_other_sections_in_place(tmp_path):
    path = tmp_path / "RESULTS.md"
    append_results(path, ["### run 1"])
    text = path.read_text()
    assert text.startswith("# ") and RESULTS_HEADING in text and text.rstrip().endswith("### run 1")
    path.write_text(text + "\n## Daemon\n\n### daemon run\n")
    append_results(path, ["### run 2"])
    lines = path.read_text().splitlines()
    assert lines.index("### run 1") < lines.index("### run 2") < lines.index("## Daemon") < lines.index("### daemon run")
