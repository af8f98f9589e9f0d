"""The Large Movie Review Dataset (IMDB) as raw text, from a folder, an archive or the web.

`load_data` returns the reviews as strings (what `keras.layers.TextVectorization`
wants), with a validation split carved out of the training reviews, never out of
the test reviews. It reads, in order of preference:

- an extracted `aclImdb/` folder (or the folder that contains it);
- the `aclImdb_v1.tar.gz` archive, streamed with `tarfile` without extracting
  anything (about 2 s for the 50,000 reviews, faster than extracting them);
- nothing given: Stanford's archive downloaded once with `keras.utils.get_file`
  into the Keras cache (`~/.keras/datasets/`), then read like a local archive.

`load_imdb` is what the examples call: it takes the full data from a given
path, else from the Keras cache, else from the web, and when none of these
is available (no network) it falls back quickly, without a traceback, to the
embedded sample: 4,000 real reviews (1,000 per split and class, drawn
reproducibly from Stanford's archive) shipped inside the package.

`load_sequences` is `keras.datasets.imdb.load_data` (integer sequences) with a
local `path=` for users who start from Keras's preprocessed `imdb.npz`.

Reference: Maas et al. (2011), Learning Word Vectors for Sentiment Analysis.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import urllib.request
from typing import NamedTuple

import numpy as np

from keras_factorized import _keras_compat
from keras_factorized.datasets.imdb_archive import CLASS_NAMES
from keras_factorized.datasets.imdb_archive import SPLITS
from keras_factorized.datasets.imdb_archive import extract
from keras_factorized.datasets.imdb_archive import read_archive
from keras_factorized.datasets.imdb_archive import read_folder
from keras_factorized.validation import invalid_value

__all__ = [
    "CLASS_NAMES",
    "IMDB_URL",
    "ImdbData",
    "SPLITS",
    "Source",
    "Split",
    "balanced_sample",
    "cached_archive",
    "download",
    "extract",
    "find_data",
    "load_data",
    "load_datasets",
    "load_imdb",
    "load_sequences",
    "read_reviews",
]

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
KERAS_IMDB_NPZ_SHA256 = "69664113be75683a8fe16e3ed0ab59fda8886cb3cd7ada244f7d9544e4676b9f"
SAMPLE_ARCHIVE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "data", "imdb_sample.tar.gz"
)

class Split(NamedTuple):
    """Reviews of one split: `texts` (object array of str) and `labels` (int32, 1 = pos)."""

    texts: np.ndarray
    labels: np.ndarray


class ImdbData(NamedTuple):
    """The three splits returned by `load_data`; unpacks as `train, val, test`."""

    train: Split
    validation: Split
    test: Split


class Source(NamedTuple):
    """Where `load_imdb` took the reviews from.

    `kind` is `"path"` (given by the caller), `"cache"` (the Keras cache),
    `"download"` (downloaded now) or `"sample"` (the embedded sample);
    `path` the folder or archive read; `message` one line for the user.
    """

    kind: str
    path: str
    message: str



def download(cache_dir: str | None = None) -> str:
    """Downloads Stanford's `aclImdb_v1.tar.gz` into the Keras cache (once).

    `keras.utils.get_file` checks the SHA-256 and removes a partial download,
    so the cache never holds a truncated archive under the final name.

    Args:
        cache_dir: The Keras cache folder; `None` means `~/.keras` (or
            `$KERAS_HOME`). The archive goes into its `datasets/` subfolder.

    Returns:
        The path of the archive.
    """
    import keras

    return keras.utils.get_file(
        "aclImdb_v1.tar.gz",
        origin=IMDB_URL,
        file_hash=IMDB_SHA256,
        cache_dir=cache_dir,
        cache_subdir="datasets",
    )


def cached_archive(cache_dir: str | None = None) -> str | None:
    """The path of Stanford's archive in the Keras cache, or `None` if absent.

    Args:
        cache_dir: The Keras cache folder; `None` means `$KERAS_HOME` or
            `~/.keras`, as `keras.utils.get_file` does.
    """
    if cache_dir is None:
        cache_dir = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    path = os.path.join(cache_dir, "datasets", "aclImdb_v1.tar.gz")
    return path if os.path.isfile(path) else None


def _reachable(url: str, timeout: float) -> bool:
    """Whether a HEAD request to `url` answers within `timeout` seconds.

    Runs in a daemon thread so that a hanging name lookup, which socket
    timeouts do not cover, cannot hold the caller longer than `timeout`.
    """
    answer = []

    def probe():
        try:
            request = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(request, timeout=timeout):
                answer.append(True)
        except Exception:  # Any failure means "not reachable now".
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer)


def _try_download(cache_dir, timeout):
    """`(path, None)` after a download, or `(None, reason)` without a traceback."""
    if not _reachable(IMDB_URL, timeout):
        return None, f"{IMDB_URL} could not be reached (waited at most {timeout:g} s)"
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # A stalled transfer fails instead of hanging.
    try:
        return download(cache_dir), None
    except Exception as e:  # get_file wraps network errors in plain Exceptions.
        return None, f"the download failed ({type(e).__name__}: {e})"
    finally:
        socket.setdefaulttimeout(previous)


def find_data(
    path: str | None = None,
    *,
    cache_dir: str | None = None,
    download_timeout: float | None = 10.0,
) -> Source:
    """Chooses the IMDB data to read: `path`, the cache, a download or the sample.

    Args:
        path: An `aclImdb/` folder or `aclImdb_v1.tar.gz`; when given it is
            used as it is (and must exist).
        cache_dir: Keras cache folder (default `~/.keras`).
        download_timeout: Seconds the web may take to answer before the
            embedded sample is used instead; `None` never downloads.

    Returns:
        A `Source(kind, path, message)`.

    Example:

    >>> source = find_data(download_timeout=None, cache_dir="/nonexistent")
    >>> source.kind, os.path.basename(source.path)
    ('sample', 'imdb_sample.tar.gz')
    """
    if path is not None:
        path = os.fspath(path)
        return Source("path", path, f"IMDB data: {path}")
    cached = cached_archive(cache_dir)
    if cached:
        return Source("cache", cached, f"IMDB data: the full dataset, cached at {cached}")
    reason = "downloading is off"
    if download_timeout is not None:
        downloaded, reason = _try_download(cache_dir, download_timeout)
        if downloaded:
            return Source(
                "download", downloaded, f"IMDB data: the full dataset, downloaded to {downloaded}"
            )
    return Source(
        "sample",
        SAMPLE_ARCHIVE,
        "IMDB data: the embedded sample (4,000 real reviews, 1,000 per split and "
        f"class) because the full dataset is not cached and {reason}. For the "
        f"full 50,000 reviews, download {IMDB_URL} and pass it with "
        "`--data PATH`, or run again with network access (it is cached once "
        "downloaded).",
    )


def load_imdb(
    path: str | None = None,
    *,
    validation_split: float = 0.2,
    seed: int = 1337,
    max_samples: int | None = None,
    cache_dir: str | None = None,
    download_timeout: float | None = 10.0,
) -> tuple[ImdbData, Source]:
    """`load_data` on the data `find_data` chooses; returns the data and its source.

    The examples' loader: with `path=None` it reads the full dataset when it
    is cached or can be downloaded, otherwise the embedded sample, so it
    always returns real reviews, even offline. Print `source.message` to tell
    the user which data was used.

    Args:
        path: See `find_data`.
        validation_split: See `load_data`.
        seed: See `load_data`.
        max_samples: See `load_data`.
        cache_dir: See `find_data`.
        download_timeout: See `find_data`.

    Returns:
        `(ImdbData, Source)`.

    Example:

    >>> data, source = load_imdb(download_timeout=None, cache_dir="/nonexistent")
    >>> source.kind, [len(split.texts) for split in data]
    ('sample', [1600, 400, 2000])
    """
    source = find_data(path, cache_dir=cache_dir, download_timeout=download_timeout)
    data = load_data(
        source.path,
        validation_split=validation_split,
        seed=seed,
        max_samples=max_samples,
    )
    return data, source


def read_reviews(path: str | None = None, *, cache_dir: str | None = None):
    """Reads every review of the train and test splits, in a fixed order.

    Args:
        path: An `aclImdb/` folder (or its parent), an `aclImdb_v1.tar.gz`
            archive, or `None` to download the archive into the Keras cache.
        cache_dir: Keras cache folder used when `path` is `None`.

    Returns:
        A dict `{"train": Split, "test": Split}`, sorted by class then review id.
    """
    if path is None:
        path = download(cache_dir)
    path = os.fspath(path)
    if os.path.isdir(path):
        reviews = read_folder(path)
    elif os.path.isfile(path):
        reviews = read_archive(path)
    else:
        raise ValueError(
            f"Received an invalid value for `path`, expected an `aclImdb` folder "
            "or an `aclImdb_v1.tar.gz` archive (or None to download it), but "
            f"nothing exists at that path. Received: path={path!r}"
        )
    result = {}
    for split in SPLITS:
        for label, class_name in enumerate(CLASS_NAMES):
            if not reviews[split][label]:
                raise ValueError(
                    f"The IMDB data at {path!r} is incomplete: "
                    f"`aclImdb/{split}/{class_name}` has no reviews. "
                    f"Received: path={path!r}"
                )
        texts = reviews[split][0] + reviews[split][1]
        labels = [0] * len(reviews[split][0]) + [1] * len(reviews[split][1])
        result[split] = Split(np.array(texts, dtype=object), np.array(labels, dtype="int32"))
    return result


def load_data(
    path: str | None = None,
    *,
    validation_split: float = 0.2,
    seed: int = 1337,
    max_samples: int | None = None,
    cache_dir: str | None = None,
) -> ImdbData:
    """Loads IMDB reviews as raw strings, with a validation split taken from train.

    Reviews are shuffled with `seed`; the validation reviews are the last
    `validation_split` fraction of the shuffled training reviews, so the test
    split stays untouched and the same seed always gives the same split.

    Args:
        path: An extracted `aclImdb/` folder (or the folder containing it), the
            `aclImdb_v1.tar.gz` archive, or `None` to download the archive
            from Stanford into the Keras cache (`keras.utils.get_file`).
        validation_split: Fraction of the training reviews held out for
            validation, in [0, 1).
        seed: Seed of the shuffle (and so of the split).
        max_samples: If set, keep only this many (shuffled) training reviews,
            and this many test reviews, for quick runs.
        cache_dir: Keras cache folder for the download (default `~/.keras`).

    Returns:
        `ImdbData(train, validation, test)`, each a `Split(texts, labels)` of
        NumPy arrays: `texts` holds Python strings (dtype object), `labels`
        int32 with 1 for positive reviews.

    Example:

    >>> from keras_factorized.datasets import imdb
    >>> train, val, test = imdb.load_data("tests/data/imdb_fixture/aclImdb_mini.tar.gz")
    >>> len(train.texts) + len(val.texts) == 200, test.labels.dtype.name
    (True, 'int32')
    """
    if isinstance(validation_split, bool) or not (
        isinstance(validation_split, (int, float)) and 0 <= validation_split < 1
    ):
        raise invalid_value("validation_split", "a float in [0, 1)", validation_split)
    if max_samples is not None and (
        isinstance(max_samples, bool)
        or not isinstance(max_samples, (int, np.integer))
        or max_samples < 2
    ):
        raise invalid_value("max_samples", "None or an integer >= 2", max_samples)
    reviews = read_reviews(path, cache_dir=cache_dir)
    rng = np.random.default_rng(seed)
    shuffled = {}
    for split in SPLITS:
        texts, labels = reviews[split]
        order = rng.permutation(len(texts))
        if max_samples is not None:
            order = order[:max_samples]
        shuffled[split] = Split(texts[order], labels[order])
    train = shuffled["train"]
    n_val = int(round(len(train.texts) * validation_split))
    if validation_split > 0 and n_val == 0:
        n_val = 1
    n_train = len(train.texts) - n_val
    if n_train < 1:
        raise ValueError(
            f"`validation_split={validation_split}` leaves no training reviews "
            f"out of {len(train.texts)}."
        )
    return ImdbData(
        Split(train.texts[:n_train], train.labels[:n_train]),
        Split(train.texts[n_train:], train.labels[n_train:]),
        shuffled["test"],
    )


def balanced_sample(split: Split, n: int, seed: int, exclude=()):
    """`n` reviews of `split`, half of each class, drawn with `seed`.

    Args:
        split: A `Split` (e.g. `read_reviews(path)["train"]`).
        n: How many reviews; the negative class gets the odd one.
        seed: Seed of the draw.
        exclude: Indices of `split` not to draw (e.g. an earlier sample's).

    Returns:
        `(texts, labels, indices)`: the reviews, their labels and their
        indices in `split`, in a shuffled order.

    Example:

    >>> reviews = read_reviews("tests/data/imdb_fixture/aclImdb_mini.tar.gz")
    >>> texts, labels, indices = balanced_sample(reviews["test"], 6, seed=0)
    >>> len(texts), int(labels.sum())
    (6, 3)
    """
    rng = np.random.default_rng(seed)
    excluded = set(int(i) for i in exclude)
    chosen = []
    for label in (0, 1):
        candidates = rng.permutation(np.nonzero(split.labels == label)[0])
        wanted = n // 2 + (n % 2 if label == 0 else 0)
        chosen += [int(i) for i in candidates if int(i) not in excluded][:wanted]
    chosen = rng.permutation(np.array(chosen, dtype=int))
    return split.texts[chosen], split.labels[chosen], chosen


def load_datasets(
    path: str | None = None,
    *,
    batch_size: int = 32,
    validation_split: float = 0.2,
    seed: int = 1337,
    max_samples: int | None = None,
    cache_dir: str | None = None,
):
    """Like `load_data`, but returns batched `tf.data.Dataset`s of `(text, label)`.

    The training dataset is reshuffled every epoch (seeded); validation and
    test keep their order. Requires TensorFlow.

    Returns:
        `(train_ds, val_ds, test_ds)`.

    Example:

    >>> from keras_factorized.datasets import imdb
    >>> train_ds, val_ds, test_ds = imdb.load_datasets(
    ...     "tests/data/imdb_fixture/aclImdb_mini.tar.gz", batch_size=16)
    >>> texts, labels = next(iter(train_ds))
    >>> tuple(texts.shape), texts.dtype.name
    ((16,), 'string')
    """
    import tensorflow as tf

    data = load_data(
        path,
        validation_split=validation_split,
        seed=seed,
        max_samples=max_samples,
        cache_dir=cache_dir,
    )

    def make(split, shuffle):
        ds = tf.data.Dataset.from_tensor_slices((split.texts.astype(str), split.labels))
        if shuffle:
            ds = ds.shuffle(len(split.texts), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    return make(data.train, True), make(data.validation, False), make(data.test, False)


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_sequences(
    path: str | None = None,
    *,
    num_words: int | None = None,
    skip_top: int = 0,
    maxlen: int | None = None,
    seed: int = 113,
    start_char: int | None = 1,
    oov_char: int | None = 2,
    index_from: int = 3,
):
    """`keras.datasets.imdb.load_data` (integer sequences) with a local `path`.

    With `path=None` this calls Keras's loader, which downloads `imdb.npz` into
    the Keras cache. With a local copy of that `imdb.npz`, the file is checked
    against Keras's SHA-256 and processed exactly like Keras does (same
    shuffle, `start_char`, `oov_char`, `index_from`, `num_words`), without
    touching the network or the file.

    Returns:
        `(x_train, y_train), (x_test, y_test)` as in Keras.
    """
    import keras

    kwargs = dict(
        num_words=num_words,
        skip_top=skip_top,
        maxlen=maxlen,
        seed=seed,
        start_char=start_char,
        oov_char=oov_char,
        index_from=index_from,
    )
    if path is None:
        return keras.datasets.imdb.load_data(**kwargs)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(
            "Received an invalid value for `path`, expected Keras's `imdb.npz` "
            f"file, but no file exists there. Received: path={path!r}"
        )
    if _sha256(path) != KERAS_IMDB_NPZ_SHA256:
        raise ValueError(
            f"The file {path!r} is not Keras's `imdb.npz` (SHA-256 mismatch: it "
            "is corrupt, incomplete or another file). Received: "
            f"path={path!r}"
        )
    return _keras_compat.load_keras_imdb_npz(path, **kwargs)
