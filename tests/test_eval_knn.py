import numpy as np
import pytest

from dinov2.eval.knn import knn_classify, topk_accuracy, topk_cosine



def brute_force_knn(train, ytr, test, yte, k, temperature, num_classes):
    """Independent reference: float64, one test sample at a time, explicit exp(s/T) votes."""
    trn = train / np.linalg.norm(train, axis=1, keepdims=True)
    ten = test / np.linalg.norm(test, axis=1, keepdims=True)
    top1 = top5 = 0
    for i in range(len(ten)):
        sims = trn.astype(np.float64) @ ten[i].astype(np.float64)
        nearest = np.argsort(-sims, kind="stable")[:k]
        scores = np.zeros(num_classes)
        for j in nearest:
            scores[ytr[j]] += np.exp(sims[j] / temperature)
        ranking = sorted(range(num_classes), key=lambda c: -scores[c])
        top1 += ranking[0] == yte[i]
        top5 += yte[i] in ranking[:5]
    return 100.0 * top1 / len(ten), 100.0 * top5 / len(ten)


def random_problem(seed=0, n_train=300, n_test=80, dim=16, classes=7):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim))
    ytr = rng.integers(0, classes, n_train)
    yte = rng.integers(0, classes, n_test)
    # Heavy noise: classes overlap, so accuracies land strictly between 0 and 100.
    train = centers[ytr] + 1.5 * rng.normal(size=(n_train, dim))
    test = centers[yte] + 1.5 * rng.normal(size=(n_test, dim))
    return train.astype(np.float32), ytr, test.astype(np.float32), yte


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_knn_matches_brute_force_reference(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    train, ytr, test, yte = random_problem()
    ks = (1, 5, 20, 100)
    res = knn_classify(train, ytr, test, yte, ks=ks, temperature=0.07, backend=backend, chunk_size=17)
    seen = set()
    for k in ks:
        ref1, ref5 = brute_force_knn(train, ytr, test, yte, k, 0.07, 7)
        got = res["results"][str(k)]
        assert got["top1"] == pytest.approx(ref1), k
        assert got["top5"] == pytest.approx(ref5), k
        seen.add(got["top1"])
    assert len(seen) > 1 and 0 < min(seen) < 100  # the problem is not trivially solved


def test_knn_temperature_matters_and_is_used():
    train, ytr, test, yte = random_problem(seed=3)
    for t in (0.02, 0.5):
        ref1, _ = brute_force_knn(train, ytr, test, yte, 50, t, 7)
        assert knn_classify(train, ytr, test, yte, ks=(50,), temperature=t)["results"]["50"]["top1"] == pytest.approx(ref1)


def test_knn_planted_separable_reaches_100():
    rng = np.random.default_rng(1)
    classes, dim = 10, 32
    centers = np.eye(dim)[:classes] * 10
    ytr = np.repeat(np.arange(classes), 30)
    yte = np.repeat(np.arange(classes), 5)
    train = centers[ytr] + 0.1 * rng.normal(size=(len(ytr), dim))
    test = centers[yte] + 0.1 * rng.normal(size=(len(yte), dim))
    res = knn_classify(train, ytr, test, yte, ks=(10, 20))
    assert res["results"]["10"]["top1"] == 100.0
    assert res["results"]["20"]["top1"] == 100.0
    assert res["best"]["top1"] == 100.0


def test_torch_and_faiss_neighbours_agree():
    pytest.importorskip("faiss")
    train, _, test, _ = random_problem(seed=2)
    s_t, i_t = topk_cosine(train, test, 10, backend="torch", chunk_size=7)
    s_f, i_f = topk_cosine(train, test, 10, backend="faiss")
    np.testing.assert_array_equal(i_t, i_f)
    np.testing.assert_allclose(s_t, s_f, atol=1e-5)


def test_k_larger_than_train_is_clipped_and_reported():
    train, ytr, test, yte = random_problem(n_train=30)
    res = knn_classify(train, ytr, test, yte, ks=(10, 200))
    assert res["results"]["200"]["k_used"] == 30
    ref1, ref5 = brute_force_knn(train, ytr, test, yte, 30, 0.07, 7)
    assert res["results"]["200"]["top1"] == pytest.approx(ref1)


def test_top5_with_fewer_than_five_classes_and_sparse_labels():
    # Labels {0, 3}: absent classes must not break the vote; top-5 of 4 classes is always right.
    rng = np.random.default_rng(0)
    ytr = rng.choice([0, 3], 40)
    yte = rng.choice([0, 3], 10)
    train, test = rng.normal(size=(40, 4)), rng.normal(size=(10, 4))
    res = knn_classify(train, ytr, test, yte, ks=(5,))
    assert res["num_classes"] == 4 and res["results"]["5"]["top5"] == 100.0


def test_topk_accuracy_small_example():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = np.array([1, 2, 1])
    assert topk_accuracy(scores, labels, 1) == pytest.approx(100 / 3)
    assert topk_accuracy(scores, labels, 2) == pytest.approx(200 / 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(train_feats=np.zeros((0, 4))), "train_feats"),
        (dict(test_feats=np.ones((3, 5))), "feature dims differ"),
        (dict(train_labels=np.arange(9)), "train_labels"),
        (dict(ks=(0,)), "ks"),
        (dict(temperature=0.0), "temperature"),
        (dict(test_feats=np.full((3, 4), np.nan)), "NaN"),
    ],
)
def test_knn_bad_input_is_named(kwargs, match):
    base = dict(train_feats=np.ones((10, 4)), train_labels=np.arange(10) % 2,
                test_feats=np.ones((3, 4)), test_labels=np.array([0, 1, 0]))
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        knn_classify(**base)
