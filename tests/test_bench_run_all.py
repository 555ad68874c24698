"""``make bench ARGS=--quick``: quick results never overwrite the committed tables; the warm-up runs."""

import pytest

from benchmarks.run_all import main, results_kept, warm_up, write_index


def test_quick_results_go_aside_and_committed_tables_stay(tmp_path):
    results, quick = tmp_path / "results", tmp_path / "results" / "quick"
    results.mkdir()
    (results / "train.md").write_text("committed train table")
    (results / "attention.md").write_text("committed attention table")
    with results_kept(results, quick) as directory:
        assert directory == quick
        (results / "train.md").write_text("quick train table")  # a script overwrites a committed table
        (results / "new.json").write_text("{}")  # and writes a new one
    assert (results / "train.md").read_text() == "committed train table"
    assert (results / "attention.md").read_text() == "committed attention table"
    assert not (results / "new.json").exists()
    assert (quick / "train.md").read_text() == "quick train table" and (quick / "new.json").read_text() == "{}"
    assert not (quick / "attention.md").exists()  # untouched tables are not copied


def test_committed_tables_are_restored_when_a_benchmark_crashes(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "train.md").write_text("committed")
    with pytest.raises(KeyboardInterrupt):
        with results_kept(results, results / "quick"):
            (results / "train.md").write_text("half-written quick")
            raise KeyboardInterrupt
    assert (results / "train.md").read_text() == "committed"


def test_index_collects_every_table(tmp_path):
    (tmp_path / "b.md").write_text("### B\n")
    (tmp_path / "a.md").write_text("### A\n")
    index = write_index(tmp_path)
    assert index.read_text() == "# Benchmark results\n\n### A\n\n### B\n"
    write_index(tmp_path)  # the index itself is not collected into the next index
    assert index.read_text().count("### A") == 1


def test_warm_up_runs_for_about_the_asked_time():
    assert 0.05 <= warm_up(0.05) < 30


def test_unknown_benchmark_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--only", "nope", "--no-warmup"])
    assert "unknown benchmark(s) ['nope']" in capsys.readouterr().err


def test_readme_links_only_files_that_exist():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    links = [target for target in re.findall(r"\]\(([^)#\s]+)\)", text) if "://" not in target]
    results = re.findall(r"`(benchmarks/results/[\w.\-]+\.(?:md|json))`", text)
    missing = [path for path in links + results if not (root / path).exists()]
    assert not missing, f"README.md names files that do not exist: {missing}"
    assert "benchmarks/results/README.md" in links
