"""PCA-hash dedup: codes, Hamming range search against brute force, and the stage on real photos
(scikit-image) with planted re-encoded, rescaled and cropped copies."""

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage")

from data_curation import hash_dedup as hash_dedup_module  # noqa: E402
from data_curation import pca_hash  # noqa: E402
from data_curation.arrays import CurationInputError  # noqa: E402
from data_curation.examples.planted_photos import pair_scores, photo, write_planted_photos  # noqa: E402
from data_curation.hash_dedup import hash_dedup_stage  # noqa: E402
from data_curation.report import read_report  # noqa: E402

SUBSET = ("astronaut", "camera", "coffee", "coins", "horse", "rocket", "page", "clock")


def brute_force_pairs(codes, radius):
    d = pca_hash.hamming_distances(codes[:, None, :], codes[None, :, :])
    i, j = np.nonzero(np.triu(d <= radius, k=1))
    return set(zip(i.tolist(), j.tolist(), d[i, j].tolist()))


@pytest.mark.parametrize("factory", ["BFlat", "BHash4x16", "BHash8x8"])
@pytest.mark.parametrize("radius", [0, 3, 9])
def test_radius_pairs_equal_brute_force(factory, radius, tmp_path):
    rng = np.random.default_rng(radius)
    codes = rng.integers(0, 256, (400, 8), dtype=np.uint8)
    for row in range(0, 100, 2):  # plant near codes: flip a few random bits of another row
        bits = np.unpackbits(codes[row + 1])
        bits[rng.choice(64, int(rng.integers(0, 12)), replace=False)] ^= 1
        codes[row] = np.packbits(bits)
    i, j, d = pca_hash.radius_pairs(codes, radius, factory=factory, chunk_rows=128, progress=False, work_dir=tmp_path)
    assert set(zip(i.tolist(), j.tolist(), d.tolist())) == brute_force_pairs(codes, radius)
    again = pca_hash.radius_pairs(codes, radius, factory=factory, chunk_rows=128, progress=False, work_dir=tmp_path)
    np.testing.assert_array_equal(again[0], i)  # resumed from the saved chunks


def test_approximate_binary_ivf_finds_a_subset():
    codes = np.random.default_rng(0).integers(0, 256, (500, 8), dtype=np.uint8)
    codes[1] = codes[0]
    i, j, d = pca_hash.radius_pairs(codes, 6, factory="BIVF8", search_params="nprobe=2", progress=False)
    assert set(zip(i.tolist(), j.tolist(), d.tolist())) <= brute_force_pairs(codes, 6)
    assert (0, 1, 0) in set(zip(i.tolist(), j.tolist(), d.tolist()))


def test_codes_are_robust_to_brightness_and_the_basis_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    thumbs = rng.integers(0, 200, (300, 16, 16)).astype(np.uint8)
    basis = pca_hash.fit_basis(pca_hash.standardize(thumbs), 64, 16)
    brighter = (thumbs.astype(np.int64) // 2 + 40).astype(np.uint8)  # contrast halved, brightness shifted
    codes, shifted = pca_hash.encode(basis, pca_hash.standardize(thumbs)), pca_hash.encode(basis, pca_hash.standardize(brighter))
    assert np.mean(pca_hash.hamming_distances(codes, shifted)) < 2
    assert abs(np.unpackbits(codes, axis=1).mean() - 0.5) < 0.01  # median thresholds: balanced bits
    basis.save(tmp_path / "basis.npz")
    np.testing.assert_array_equal(pca_hash.encode(pca_hash.PCAHashBasis.load(tmp_path / "basis.npz"), pca_hash.standardize(thumbs)), codes)


@pytest.mark.parametrize("call,message", [
    (lambda: pca_hash.validate_radius(32, 64), r"Hamming radius must be an integer in \[0, 31\]"),
    (lambda: pca_hash.validate_radius(-1, 64), "Hamming radius"),
    (lambda: pca_hash.validate_bits(60, 16), "multiple of 8"),
    (lambda: pca_hash.validate_bits(512, 16), "at least 512 pixels"),
    (lambda: pca_hash.make_binary_index(64, "BNope", 4), "invalid FAISS binary factory"),
    (lambda: pca_hash.make_binary_index(64, "BHNSW16", 4), "no range search"),
    (lambda: pca_hash.fit_basis(np.zeros((30, 256)), 64, 16), "more than 64 decodable images"),
])
def test_bad_parameters_are_clear_errors(call, message):
    with pytest.raises(CurationInputError, match=message):
        call()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    planted = write_planted_photos(root / "images", copies_per_kind=6, photos=SUBSET, seed=1)
    # The best-member rule: an original with a same-size JPEG re-encode and a downscaled copy.
    special = root / "images" / "special"
    special.mkdir()
    chelsea = photo("chelsea")
    chelsea.save(special / "b_original.png")
    chelsea.save(special / "a_reencoded.jpg", quality=50)
    chelsea.resize((300, 200)).save(special / "c_small.png")
    (root / "images" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return planted


def test_stage_finds_planted_copies_keeps_the_best_and_reports(planted, tmp_path):
    out = tmp_path / "hash"
    result = hash_dedup_stage(planted.root, out, progress=False)
    s = result.summary
    assert s["rows_in"] == len(planted.originals) + len(planted.truth) + 4
    assert s["removed_undecodable"] == 1 and s["rows_out"] == s["rows_in"] - 1 - s["removed_near_copy"]
    errors = (out / "errors.txt").read_text().splitlines()
    assert len(errors) == 1 and errors[0].startswith(str(planted.root / "broken.jpg") + "\t")
    paths = (out / "paths.txt").read_text().splitlines()
    groups = np.load(out / "groups.npy")
    normal = [n for n, p in enumerate(paths) if "/special/" not in p]
    scores = pair_scores([paths[n] for n in normal], groups[normal], planted)
    assert scores["recall"] >= 0.7 and scores["precision"] >= 0.95, scores  # crops are the hard case (README)
    assert scores["per_kind"]["jpeg"]["recall"] == 1.0 and scores["per_kind"]["rescale"]["recall"] >= 0.8

    special = {p.rsplit("/", 1)[1]: n for n, p in enumerate(paths) if "/special/" in p}
    representative = np.load(out / "representative.npy")
    assert {int(representative[n]) for n in special.values()} == {special["b_original.png"]}
    kept = (out / "kept_paths.txt").read_text().splitlines()
    assert str(planted.root / "special" / "b_original.png") in kept
    assert not {str(planted.root / "special" / name) for name in ("a_reencoded.jpg", "c_small.png")} & set(kept)

    # report.csv: every removed row names its kept representative and their true Hamming distance.
    codes = np.load(out / "codes.npy")
    rows = read_report(out / "report.csv")
    removed = [r for r in rows if r["decision"] == "removed" and r["row"] != "-1"]
    assert len(removed) == s["removed_near_copy"]
    for r in removed:
        row, rep = int(r["row"]), int(r["representative_row"])
        assert r["path"] == paths[row] and r["representative_path"] == paths[rep] and rep in np.load(out / "keep.npy")
        assert int(r["link"]) == pca_hash.hamming_distances(codes[row], codes[rep]) <= 10
    assert [r for r in rows if r["reason"].startswith("undecodable")][0]["path"] == str(planted.root / "broken.jpg")
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.size[0] > 200 and sheet.size[1] > 150

    again = hash_dedup_stage(planted.root, out, progress=False)
    assert again.skipped and again.summary == s


def test_stage_resumes_after_a_kill_and_checks_input_first(planted, tmp_path, monkeypatch):
    out = tmp_path / "hash"
    real = hash_dedup_module.read_thumbnail
    calls = {"n": 0}

    def dies_after_the_first_part(path, size):
        calls["n"] += 1
        if calls["n"] > calls.get("limit", 10**9):
            raise KeyboardInterrupt("simulated kill")
        return real(path, size)

    monkeypatch.setattr(hash_dedup_module, "read_thumbnail", dies_after_the_first_part)
    calls["limit"] = 40
    with pytest.raises(KeyboardInterrupt):
        hash_dedup_stage(planted.root, out, part_size=40, progress=False)
    finished = list((out / ".work").rglob("part_*.npz"))
    assert len(finished) == 1
    calls.update(n=0, limit=10**9)
    resumed = hash_dedup_stage(planted.root, out, part_size=40, progress=False)
    assert not resumed.skipped and not (out / ".work").exists()
    assert calls["n"] == resumed.summary["rows_in"] - 40  # the finished part was reused, not redone
    monkeypatch.setattr(hash_dedup_module, "read_thumbnail", real)
    hash_dedup_stage(planted.root, tmp_path / "fresh", part_size=40, progress=False)
    for name in ("codes.npy", "groups.npy", "keep.npy"):
        np.testing.assert_array_equal(np.load(out / name), np.load(tmp_path / "fresh" / name))

    for kwargs, message in [({"radius": 40}, "Hamming radius"), ({"bits": 65}, "multiple of 8"),
                            ({"factory": "BHNSW8"}, "no range search"), ({"rule": "chain"}, "group rule")]:
        with pytest.raises(CurationInputError, match=message):
            hash_dedup_stage(planted.root, tmp_path / "bad", progress=False, **kwargs)
    assert not (tmp_path / "bad").exists()
