"""Grouping rules (representative vs connected), best-first choice, report.csv and contact sheet."""

import numpy as np
import pytest
from PIL import Image

from data_curation.arrays import CurationInputError
from data_curation.groups import best_first_order, group_rows, pair_graph
from data_curation.report import REPORT_COLUMNS, contact_sheet, group_report_rows, read_report, summary, write_report


def chain_graph():
    # A(0) - B(1) - C(2) linked in a chain, D(3) alone, E(4) = copy of D at distance 0.
    return pair_graph([0, 1, 3], [1, 2, 4], [2, 3, 0], 5)


def test_representative_rule_does_not_chain():
    # A is best: it takes B; C is only linked to B, so it is not merged with A.
    groups = group_rows(chain_graph(), np.array([0, 1, 2, 3, 4]), "representative")
    np.testing.assert_array_equal(groups.representative, [0, 0, 2, 3, 3])
    np.testing.assert_array_equal(groups.keep, [0, 2, 3])
    np.testing.assert_array_equal(groups.group, [0, 0, 1, 2, 2])
    assert groups.link[1] == 2 and groups.link[4] == 0  # a distance of 0 is a link, not a missing value
    assert np.isnan(groups.link[[0, 2, 3]]).all()


def test_representative_rule_takes_every_direct_neighbour_of_the_best_row():
    # B is best: A and C are both linked to B directly, so both join B's group.
    groups = group_rows(chain_graph(), np.array([1, 0, 2, 4, 3]), "representative")
    np.testing.assert_array_equal(groups.representative, [1, 1, 1, 4, 4])
    np.testing.assert_array_equal(groups.keep, [1, 4])
    np.testing.assert_array_equal(groups.link[[0, 2, 3]], [2, 3, 0])


def test_connected_rule_follows_chains_and_keeps_the_best_row():
    groups = group_rows(chain_graph(), np.array([2, 0, 1, 4, 3]), "connected")
    np.testing.assert_array_equal(groups.representative, [2, 2, 2, 4, 4])
    np.testing.assert_array_equal(groups.group, [0, 0, 0, 1, 1])
    assert np.isnan(groups.link[0])  # A reaches C only through B: no direct link value
    assert groups.link[1] == 3 and groups.link[3] == 0


def test_pairs_found_twice_count_once_and_bad_order_is_rejected():
    graph = pair_graph([0, 1, 2], [1, 0, 2], [5, 5, 0], 3)
    assert graph.nnz == 2 and graph[0, 1] == 6  # stored as value + 1
    with pytest.raises(CurationInputError, match="permutation"):
        group_rows(graph, np.array([0, 0, 1]))
    with pytest.raises(CurationInputError, match="group rule"):
        group_rows(graph, np.arange(3), "transitive")


def test_best_first_order_sorts_by_keys_then_row():
    pixels = np.array([100, 400, 400, 50])
    lossless = np.array([1, 0, 1, 1])
    np.testing.assert_array_equal(best_first_order(-pixels, -lossless), [2, 1, 0, 3])
    np.testing.assert_array_equal(best_first_order(np.zeros(3)), [0, 1, 2])


def test_report_csv_and_contact_sheet(tmp_path):
    paths = [str(tmp_path / f"img{i}.png") for i in range(5)]
    for i, path in enumerate(paths):
        Image.new("RGB", (40 + 10 * i, 30), (50 * i, 100, 150)).save(path)
    groups = group_rows(chain_graph(), np.array([0, 1, 2, 3, 4]), "representative")
    rows = group_report_rows("test", paths, groups, "hamming", "near copy")
    write_report(tmp_path / "report.csv", rows)
    read = read_report(tmp_path / "report.csv")
    assert tuple(read[0]) == REPORT_COLUMNS
    assert [(r["row"], r["decision"], r["representative_row"], r["link"]) for r in read] == [
        ("0", "kept", "0", ""), ("1", "removed", "0", "2"), ("3", "kept", "3", ""), ("4", "removed", "3", "0")]
    assert read[1]["representative_path"] == paths[0] and read[1]["reason"] == "near copy"
    sheet = contact_sheet(tmp_path / "sheet.png", [[(paths[0], "kept", True), (paths[1], "d=2", False)],
                                                   [(str(tmp_path / "missing.png"), "kept", True)]], title="t")
    with Image.open(sheet) as image:
        assert image.size[0] >= 2 * 128 and image.size[1] >= 2 * 128
        # the kept tile has a green frame, the removed one a red frame
        assert image.getpixel((7, 22 + 6 + 1))[1] > 100 and image.getpixel((7 + 134, 22 + 6 + 1))[0] > 200
    assert contact_sheet(tmp_path / "none.png", []) is None and not (tmp_path / "none.png").exists()
    assert summary(10, {"near_copy": 3, "undecodable": 1}, 6) == {
        "rows_in": 10, "removed_near_copy": 3, "removed_undecodable": 1, "rows_out": 6}
