"""Tests of keras_factorized.datasets.imdb on the committed fixture of real reviews."""

import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from keras_factorized.datasets import imdb
from keras_factorized.datasets import imdb_archive

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "data", "imdb_fixture", "aclImdb_mini.tar.gz")
SHARED = os.path.join(HERE, "..", "..", "shared", "data", "aclImdb_v1.tar.gz")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return imdb.extract(FIXTURE, str(tmp_path_factory.mktemp("imdb")))


def test_archive_has_both_splits_and_classes():
    data = imdb.load_data(FIXTURE, validation_split=0.2, seed=0)
    assert [len(s.texts) for s in data] == [160, 40, 100]
    for split in data:
        assert split.texts.dtype == object and isinstance(split.texts[0], str)
        assert split.labels.dtype == np.int32
        assert set(np.unique(split.labels)) == {0, 1}


def test_folder_and_archive_give_the_same_data(folder):
    from_folder = imdb.load_data(folder, seed=3)
    from_archive = imdb.load_data(FIXTURE, seed=3)
    parent = imdb.load_data(os.path.dirname(folder), seed=3)
    for a, b, c in zip(from_folder, from_archive, parent):
        assert list(a.texts) == list(b.texts) == list(c.texts)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_validation_comes_from_train_never_test_and_is_seeded():
    full = imdb.read_reviews(FIXTURE)
    data = imdb.load_data(FIXTURE, validation_split=0.25, seed=7)
    train_texts = set(full["train"].texts)
    assert set(data.validation.texts) <= train_texts
    assert set(data.train.texts) <= train_texts
    assert not set(data.validation.texts) & set(data.train.texts)
    assert set(data.test.texts) == set(full["test"].texts)
    again = imdb.load_data(FIXTURE, validation_split=0.25, seed=7)
    other = imdb.load_data(FIXTURE, validation_split=0.25, seed=8)
    assert list(again.validation.texts) == list(data.validation.texts)
    assert list(other.validation.texts) != list(data.validation.texts)


def test_labels_match_the_folders(folder):
    reviews = imdb.read_reviews(folder)
    with open(os.path.join(folder, "train", "pos", sorted(os.listdir(os.path.join(folder, "train", "pos")))[0]), encoding="utf-8") as f:
        text = f.read()
    index = list(reviews["train"].texts).index(text)
    assert reviews["train"].labels[index] == 1


def test_max_samples():
    data = imdb.load_data(FIXTURE, max_samples=20, validation_split=0.25)
    assert [len(s.texts) for s in data] == [15, 5, 20]


def test_missing_class_folder_is_a_clear_error(folder, tmp_path):
    broken = tmp_path / "aclImdb"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "train" / "pos")
    with pytest.raises(ValueError, match="train/pos"):
        imdb.load_data(str(tmp_path))


def test_empty_split_is_a_clear_error(folder, tmp_path):
    broken = tmp_path / "aclImdb"
    shutil.copytree(folder, broken)
    for name in os.listdir(broken / "test" / "neg"):
        os.unlink(broken / "test" / "neg" / name)
    with pytest.raises(ValueError, match="test/neg` has no reviews"):
        imdb.load_data(str(broken))


def test_archive_without_a_split_is_a_clear_error(tmp_path):
    path = tmp_path / "partial.tar.gz"
    with tarfile.open(FIXTURE) as src, tarfile.open(path, "w:gz") as out:
        for member in src:
            if "/test/" not in member.name:
                out.addfile(member, src.extractfile(member) if member.isfile() else None)
    with pytest.raises(ValueError, match="test/neg` has no reviews"):
        imdb.load_data(str(path))


def test_truncated_archive_is_a_clear_error_and_extracts_nothing(tmp_path):
    data = open(FIXTURE, "rb").read()
    path = tmp_path / "aclImdb_v1.tar.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        imdb.load_data(str(path))
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        imdb.extract(str(path), str(cache))
    assert os.listdir(cache) == []


def test_not_an_archive_is_a_clear_error(tmp_path):
    path = tmp_path / "aclImdb_v1.tar.gz"
    path.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        imdb.load_data(str(path))


def test_missing_path_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="Received: path="):
        imdb.load_data(str(tmp_path / "nope.tar.gz"))
    with pytest.raises(ValueError, match="`validation_split`"):
        imdb.load_data(FIXTURE, validation_split=1.0)
    with pytest.raises(ValueError, match="`max_samples`"):
        imdb.load_data(FIXTURE, max_samples=0)


def test_download_goes_through_keras_get_file(monkeypatch, tmp_path):
    import keras

    calls = {}

    def fake_get_file(fname, origin, file_hash, cache_dir, cache_subdir):
        calls.update(fname=fname, origin=origin, file_hash=file_hash, cache_dir=cache_dir)
        return FIXTURE

    monkeypatch.setattr(keras.utils, "get_file", fake_get_file)
    data = imdb.load_data(cache_dir=str(tmp_path))
    assert calls["origin"] == imdb.IMDB_URL and calls["file_hash"] == imdb.IMDB_SHA256
    assert calls["cache_dir"] == str(tmp_path)
    assert len(data.test.texts) == 100


def test_load_datasets_yields_string_batches():
    pytest.importorskip("tensorflow")
    train_ds, val_ds, test_ds = imdb.load_datasets(FIXTURE, batch_size=16)
    texts, labels = next(iter(train_ds))
    assert texts.shape == (16,) and texts.dtype.name == "string"
    assert sum(int(b[1].shape[0]) for b in test_ds) == 100


def test_load_sequences_rejects_a_file_that_is_not_keras_npz(tmp_path):
    path = tmp_path / "imdb.npz"
    np.savez(path, x_train=np.zeros(2))
    with pytest.raises(ValueError, match="not Keras's `imdb.npz`"):
        imdb.load_sequences(str(path))
    with pytest.raises(ValueError, match="no file exists"):
        imdb.load_sequences(str(tmp_path / "missing.npz"))


def test_load_sequences_processes_a_verified_local_file_like_keras(monkeypatch, tmp_path):
    path = tmp_path / "imdb.npz"
    x = np.empty(3, dtype=object)
    x[:] = [[1, 2], [3], [4, 5, 6]]
    np.savez(path, x_train=x, y_train=np.array([0, 1, 0]), x_test=x, y_test=np.array([1, 1, 0]))
    monkeypatch.setattr(imdb, "KERAS_IMDB_NPZ_SHA256", imdb._sha256(str(path)))
    (x_train, y_train), (x_test, y_test) = imdb.load_sequences(str(path), seed=0)
    assert len(x_train) == 3 and all(seq[0] == 1 for seq in x_train)  # start_char
    assert sorted(len(s) for s in x_test) == [2, 3, 4]


def test_embedded_sample_is_real_balanced_and_small():
    assert os.path.getsize(imdb.SAMPLE_ARCHIVE) < 3_000_000
    reviews = imdb.read_reviews(imdb.SAMPLE_ARCHIVE)
    for split in ("train", "test"):
        assert np.bincount(reviews[split].labels).tolist() == [1000, 1000]
    # IMDB repeats a few reviews; the sample holds almost only distinct ones.
    assert len(set(reviews["train"].texts) | set(reviews["test"].texts)) > 3950
    assert all(len(text) > 10 for text in reviews["test"].texts)


def _offline(monkeypatch, tmp_path):
    """No network and an empty Keras cache."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled by the test")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(imdb, "download", refuse)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty_cache"))


def test_without_network_or_cache_load_imdb_falls_back_to_the_sample(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    data, source = imdb.load_imdb()
    assert source.kind == "sample" and source.path == imdb.SAMPLE_ARCHIVE
    assert "embedded sample" in source.message and "--data PATH" in source.message
    assert "could not be reached" in source.message
    assert [len(s.texts) for s in data] == [1600, 400, 2000]


def test_a_hanging_network_falls_back_after_the_timeout(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: time.sleep(30))
    source = imdb.find_data(download_timeout=0.2)
    assert source.kind == "sample"


def test_a_failing_download_falls_back_without_a_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(imdb, "_reachable", lambda url, timeout: True)

    def broken_get_file(*args, **kwargs):
        raise Exception("URL fetch failure: connection reset")

    import keras

    monkeypatch.setattr(keras.utils, "get_file", broken_get_file)
    source = imdb.find_data()
    assert source.kind == "sample" and "connection reset" in source.message


def test_find_data_prefers_a_path_then_the_cache_then_a_download(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    assert imdb.find_data(FIXTURE) == (
        "path", FIXTURE, f"IMDB data: {FIXTURE}"
    )
    cached = tmp_path / "cache" / "datasets" / "aclImdb_v1.tar.gz"
    cached.parent.mkdir(parents=True)
    shutil.copy(FIXTURE, cached)
    source = imdb.find_data(cache_dir=str(tmp_path / "cache"))
    assert source.kind == "cache" and source.path == str(cached)
    monkeypatch.setattr(imdb, "_reachable", lambda url, timeout: True)
    monkeypatch.setattr(imdb, "download", lambda cache_dir: FIXTURE)
    assert imdb.find_data().kind == "download"
    assert imdb.find_data(download_timeout=None).kind == "sample"


def test_load_imdb_reads_a_given_path():
    data, source = imdb.load_imdb(FIXTURE, max_samples=20, validation_split=0.25)
    assert source.kind == "path" and [len(s.texts) for s in data] == [15, 5, 20]


def test_balanced_sample_is_balanced_seeded_and_excludes():
    train = imdb.read_reviews(FIXTURE)["train"]
    texts, labels, idx = imdb.balanced_sample(train, 11, seed=0)
    assert len(texts) == 11 and int(labels.sum()) == 5
    assert list(train.texts[idx]) == list(texts)
    again = imdb.balanced_sample(train, 11, seed=0)[2]
    np.testing.assert_array_equal(idx, again)
    other = imdb.balanced_sample(train, 20, seed=1, exclude=idx)[2]
    assert not set(other) & set(idx)


@pytest.mark.skipif(not os.path.exists(SHARED), reason="../shared/data not present")
def test_full_shared_archive():
    data = imdb.load_data(SHARED)
    assert [len(s.texts) for s in data] == [20000, 5000, 25000]
    assert data.test.labels.mean() == 0.5


def test_extract_uses_the_folder_a_concurrent_extraction_published(tmp_path, monkeypatch):
    target = tmp_path / "aclImdb"
    real_read_folder = imdb_archive.read_folder

    def other_process_wins(folder):
        result = real_read_folder(folder)
        shutil.copytree(os.path.join(folder, "aclImdb"), target)  # published meanwhile
        (target / "marker").write_text("theirs")
        return result

    monkeypatch.setattr(imdb_archive, "read_folder", other_process_wins)
    assert imdb.extract(FIXTURE, str(tmp_path)) == str(target)
    assert (target / "marker").read_text() == "theirs"  # not replaced
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no leftovers
