import json

import numpy as np
import pytest
import reference_numpy as ref
from reference_numpy import flatten, make_images

from asmkit import Codebook, Index, Params, merge_topk
from asmkit._validation import ArgumentError
from asmkit.kernel import aggregate_images, prepare_descriptors
from asmkit.search import score_aggregates, score_queries
from asmkit.storage import StorageError


@pytest.fixture(scope="module")
def data(centroids40):
    db = make_images(14, 10, 40, seed=51, centroids=centroids40, empty=(5,))
    queries = make_images(4, 10, 40, seed=52, centroids=centroids40)
    return db, queries


def _state(index):
    ivf = index.inverted_file
    # Entry order within a posting list depends on insertion order; compare as sets.
    words = ivf.words_of_entries()
    ids = index.ids[ivf.slots]
    order = np.lexsort((ids, words))
    return (
        index.ids.tolist(),
        index.keys,
        ivf.offsets.tolist(),
        ids[order].tolist(),
        ivf.data[order].tolist(),
        index.idf.tolist(),
        index.norms.tolist(),
    )


@pytest.mark.parametrize("binary", [True, False])
def test_incremental_add_remove_equals_scratch(centroids40, data, binary):
    db, queries = data
    params = Params(binary=binary, use_idf=True, ma_query=3)
    book = Codebook(centroids40)
    ids = np.arange(100, 114)

    inc = Index(book, params)
    inc.add(db[7:], image_ids=ids[7:])
    inc.add(db[:3], image_ids=ids[:3])  # ids below the existing ones
    inc.add(*flatten(db[3:7], ids=ids[3:7]))  # array input (image 105 has no rows: skipped)
    inc.add([db[5]], image_ids=[105])  # the empty image, explicitly
    extra = make_images(3, 10, 40, seed=53, centroids=centroids40)
    inc.add(extra, image_ids=[7, 300, 301], keys=["x", "y", "z"])
    inc.remove([7, "y"])
    inc.remove(301)

    scratch = Index(book, params)
    scratch.add(db, image_ids=ids)
    assert _state(inc)[:1] == _state(scratch)[:1]
    assert _state(inc) == _state(scratch)
    s1, i1 = inc.search(queries)
    s2, i2 = scratch.search(queries)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(i1, i2)

    # idf and norms after the removals equal the twin on the remaining images.
    twin = ref.Database(list(zip(ids.tolist(), db)), centroids40, binary=binary, use_idf=True)
    np.testing.assert_array_equal(inc.idf, twin.idf)
    np.testing.assert_allclose(inc.norms, [twin.norms[i] for i in ids.tolist()], rtol=1e-12)


def test_keys_and_ids(centroids40, data):
    db, _ = data
    index = Index(Codebook(centroids40), "asmk_star")
    index.add(db[:3], keys=["a.jpg", "b.jpg", "c.jpg"])
    index.add(db[3:5], image_ids=[10, 11])
    assert len(index) == 5
    assert index.ids.tolist() == [0, 1, 2, 10, 11]
    assert index.keys == ["a.jpg", "b.jpg", "c.jpg", "10", "11"]
    assert index.id_of("b.jpg") == 1 and index.id_of("11") == 11
    with pytest.raises(KeyError, match="nope"):
        index.id_of("nope")
    with pytest.raises(ValueError, match="image_ids"):
        index.add(db[5:6], image_ids=[2])
    with pytest.raises(ValueError, match="keys"):
        index.add(db[5:6], image_ids=[20], keys=["a.jpg"])
    with pytest.raises(ValueError, match="ids_or_keys"):
        index.remove([99])
    assert len(index) == 5  # failed calls change nothing
    index.remove("a.jpg")
    assert index.keys == ["b.jpg", "c.jpg", "10", "11"]


def test_empty_image_scores_zero(centroids40, data):
    db, queries = data
    index = Index(Codebook(centroids40), Params(ma_query=2))
    index.add(db[:6])  # image 5 has no descriptors
    assert len(index) == 6
    scores, ids = index.search(queries)
    for row_s, row_i in zip(scores, ids):
        assert row_s[row_i.tolist().index(5)] == 0.0


def test_stats_keys_match_reference(centroids40, data):
    db, _ = data
    index = Index(Codebook(centroids40), Params())
    index.add(db)
    stats = index.stats
    assert set(stats) == {
        "images",
        "vectors_per_image",
        "mean_entries_per_vw",
        "empty_vw",
        "min_entries_per_vw",
        "max_entries_per_vw",
        "std_of_entries_per_vw",
        "imbalance_factor_of_vw",
    }
    counts = np.diff(index.inverted_file.offsets)
    assert stats["images"] == 14 and stats["vectors_per_image"] == counts.sum() / 14
    assert stats["imbalance_factor_of_vw"] == pytest.approx(len(counts) * (counts**2).sum() / counts.sum() ** 2)
    json.dumps(stats)
    inverted_file = pytest.importorskip("asmk.inverted_file")
    ref_ivf = inverted_file.IVF.initialize_empty(codebook_size=16, use_idf=False)
    assert set(ref_ivf.stats) == set(stats)


@pytest.mark.parametrize("n_shards", [1, 3, 5])
@pytest.mark.parametrize("binary,use_idf", [(True, True), (False, True), (True, False)])
def test_shards_merge_to_whole(centroids40, data, n_shards, binary, use_idf):
    db, queries = data
    index = Index(Codebook(centroids40), Params(binary=binary, use_idf=use_idf, ma_query=3))
    index.add(db, image_ids=np.arange(14) * 3)
    shards = index.split(n_shards)
    assert sum(len(s) for s in shards) == 14 and all(s.is_shard for s in shards)
    for k in (None, 4, 20):
        whole = index.search(queries, k=k)
        parts = [s.search(queries, k=k or len(index)) for s in shards]
        merged = merge_topk(parts, k=k or len(index))
        np.testing.assert_array_equal(merged[0], whole[0])
        np.testing.assert_array_equal(merged[1], whole[1])
    with pytest.raises(ValueError, match="read-only"):
        shards[0].add(db[:1], image_ids=[1000])
    with pytest.raises(ValueError, match="n_shards"):
        index.split(15)


@pytest.mark.parametrize("binary", [True, False])
def test_save_load_roundtrip(tmp_path, centroids40, data, binary):
    db, queries = data
    index = Index(Codebook(centroids40), Params(binary=binary, use_idf=True, ma_query=3))
    index.add(db, keys=[f"img{i:02d}" for i in range(14)])
    index.save(tmp_path / "db.asmkit")
    for mmap in (True, False):
        loaded = Index.load(tmp_path / "db.asmkit", mmap=mmap)
        assert loaded.params == index.params and loaded.keys == index.keys and len(loaded) == 14
        # The codebook is read into memory even from a mapped file: the kernels then need
        # no second, read-only compilation for the first query.
        assert loaded.codebook.centroids.flags.writeable
        for got, want in zip(loaded.search(queries, k=5), index.search(queries, k=5)):
            np.testing.assert_array_equal(got, want)
    # A loaded (memory-mapped) index can still change: new arrays are built in memory.
    loaded = Index.load(tmp_path / "db.asmkit")
    loaded.remove("img03")
    index.remove("img03")
    np.testing.assert_array_equal(loaded.search(queries)[0], index.search(queries)[0])
    # Shards save and load with their global idf.
    shard = index.split(2)[1]
    shard.save(tmp_path / "shard.asmkit")
    again = Index.load(tmp_path / "shard.asmkit")
    assert again.is_shard
    np.testing.assert_array_equal(again.search(queries, k=3)[0], shard.search(queries, k=3)[0])


def test_load_rejects_corruption(tmp_path, centroids40, data):
    db, _ = data
    index = Index(Codebook(centroids40))
    index.add(db)
    index.save(tmp_path / "db.asmkit")
    codes = tmp_path / "db.asmkit" / "data.npy"
    raw = bytearray(codes.read_bytes())
    raw[-3] ^= 0x10
    codes.write_bytes(bytes(raw))
    with pytest.raises(StorageError, match="data.npy"):
        Index.load(tmp_path / "db.asmkit")
    codes.write_bytes(bytes(raw[:-8]))
    with pytest.raises(StorageError, match="data.npy"):
        Index.load(tmp_path / "db.asmkit", verify=False)
    Codebook(centroids40).save(tmp_path / "cb.asmkit")
    with pytest.raises(StorageError, match="codebook"):
        Index.load(tmp_path / "cb.asmkit")


def test_search_in_chunks_equals_one_pass(centroids40):
    params = Params(binary=True, use_idf=True, ma_query=3)
    db = make_images(20, 15, 40, seed=71, centroids=centroids40)
    index = Index(Codebook(centroids40), params)
    index.add(db)
    # Non-contiguous rows (interleaved images) and an image without descriptors.
    rng = np.random.default_rng(72)
    vecs = rng.standard_normal((90, 40)).astype(np.float32)
    labels = rng.permutation(np.repeat([4, 9, 2, 7, 11], 18))
    expected = index.search(vecs, labels, k=6)
    queries = prepare_descriptors(vecs, labels, dim=40)
    got = score_queries(index.codebook, queries, index.database, params, k=6, chunk_rows=20)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    images = [vecs[:10], np.empty((0, 40), np.float32), vecs[10:50], vecs[50:]]
    whole = index.search(images, k=None)
    parts = score_queries(
        index.codebook, prepare_descriptors(images, dim=40), index.database, params, chunk_rows=15, chunk_images=2
    )
    np.testing.assert_array_equal(parts[0], whole[0])
    np.testing.assert_array_equal(parts[1], whole[1])


@pytest.mark.parametrize("binary", [True, False])
def test_add_equals_add_aggregates(centroids40, data, binary):
    db, queries = data
    params = Params(binary=binary, use_idf=True, ma_database=2, ma_query=3)
    book = Codebook(centroids40)
    direct = Index(book, params)
    direct.add(db, np.arange(300, 314), keys=[f"k{i}" for i in range(14)])
    # The aggregates of the images made in two parts (as workers would), then added:
    # list input with an image without descriptors, and array input.
    parts = Index(book, params)
    parts.add_aggregates(
        aggregate_images(book, db[:7], np.arange(300, 307), params),
        np.arange(300, 307),
        keys=[f"k{i}" for i in range(7)],
    )
    vecs, labels = flatten(db[7:], ids=np.arange(307, 314))
    parts.add_aggregates(
        aggregate_images(book, vecs, labels, params), np.arange(307, 314), keys=[f"k{i}" for i in range(7, 14)]
    )
    assert _state(parts) == _state(direct)
    np.testing.assert_array_equal(parts.search(queries)[1], direct.search(queries)[1])


def test_query_aggregates_score_as_search(centroids40, data):
    db, queries = data
    params = Params(binary=True, ma_query=3)
    index = Index(Codebook(centroids40), params)
    index.add(db)
    aggregates = aggregate_images(index.codebook, queries, None, params, side="query")
    got = score_aggregates(
        index.inverted_file, index.idf, index.database.sqrt_norms, index.ids, aggregates, params, dim=40, k=5
    )
    expected = index.search(queries, k=5)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_add_aggregates_rejects_what_does_not_fit(centroids40, data):
    db, _ = data
    book = Codebook(centroids40)
    real = aggregate_images(book, db[:2], None, Params(binary=False))
    index = Index(book, Params(binary=True))
    with pytest.raises(ArgumentError, match="aggregates"):
        index.add_aggregates(real, [0, 1])
    binary = aggregate_images(book, db[:2], None, Params(binary=True))
    with pytest.raises(ArgumentError, match="image_ids"):
        index.add_aggregates(binary, [0])
    with pytest.raises(ArgumentError, match="image_ids"):
        index.add_aggregates(binary, [3, 3])
    index.add_aggregates(binary, [0, 1])
    with pytest.raises(ArgumentError, match="already in the index"):
        index.add_aggregates(binary, [1, 2])
    with pytest.raises(ArgumentError, match="side"):
        aggregate_images(book, db[:2], None, Params(), side="both")


def test_a_shallow_copy_is_a_snapshot_that_an_add_leaves_alone():
    import copy

    rng = np.random.default_rng(5)
    codebook = Codebook(rng.standard_normal((16, 8)).astype(np.float32))
    vecs = rng.standard_normal((60, 8)).astype(np.float32)
    query, query_ids = rng.standard_normal((10, 8)).astype(np.float32), np.zeros(10, dtype=np.int64)

    def build():
        built = Index(codebook, Params(codebook_size=16))
        built.add(vecs, np.repeat(np.arange(6), 10))
        # A remove leaves fresh posting arrays that nothing else reads: the next add may
        # grow them in place.
        built.remove([5])
        return built

    expected = build().search(query, query_ids, k=8)
    index = build()
    snapshot = copy.copy(index)
    index.add(query, np.full(10, 6))
    assert index.search(query, query_ids, k=1)[1][0, 0] == 6
    got = snapshot.search(query, query_ids, k=8)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[0], expected[0])


def test_keys_of_names_images_by_id(data, centroids40):
    index = Index(Codebook(centroids40), Params())
    index.add(data[0][:4], [10, 20, 30, 40], keys=["a", "b", "c", "d"])
    assert index.keys_of([30, 10, 30]) == ["c", "a", "c"] and index.keys_of([]) == []
    with pytest.raises(ArgumentError, match="ids"):
        index.keys_of([15])
