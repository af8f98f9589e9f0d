"""Reading and extracting Stanford's IMDB release: folders and `.tar.gz` archives.

`read_folder` and `read_archive` return the reviews of an `aclImdb/` folder or
of `aclImdb_v1.tar.gz` (streamed, nothing extracted) in one order, by review
id; `extract` publishes a complete `aclImdb/` folder or nothing. Corrupt,
incomplete or misshapen data raises a one-line `ValueError` naming the path.
`keras_factorized.datasets.imdb` builds the splits on top of these.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import tarfile
import zlib

from keras_factorized import atomic_io

CLASS_NAMES = ("neg", "pos")
SPLITS = ("train", "test")

# Matches `[prefix/]aclImdb/<split>/<neg|pos>/<id>_<rating>.txt` inside an archive.
_MEMBER = re.compile(r"(?:^|/)aclImdb/(train|test)/(neg|pos)/([^/]+)\.txt$")



def _first_line(error) -> str:
    """The first line of an error's message (tarfile's can span several)."""
    return (str(error).strip().splitlines() or [""])[0]

def _sort_key(name):
    # `123_8.txt` -> 123: the numeric id gives the same order from folders and archives.
    stem = os.path.basename(name).split("_")[0]
    return (int(stem) if stem.isdigit() else -1, name)


def read_folder(root):
    """Reads `root/{train,test}/{neg,pos}/*.txt` into {split: {label: [texts]}}."""
    if os.path.isdir(os.path.join(root, "aclImdb")) and not os.path.isdir(
        os.path.join(root, "train")
    ):
        root = os.path.join(root, "aclImdb")
    reviews = {}
    for split in SPLITS:
        reviews[split] = {}
        for label, class_name in enumerate(CLASS_NAMES):
            folder = os.path.join(root, split, class_name)
            if not os.path.isdir(folder):
                raise ValueError(
                    f"The IMDB folder {root!r} has no `{split}/{class_name}` "
                    "subfolder; expected the layout of Stanford's release, "
                    "`aclImdb/{train,test}/{neg,pos}/<id>_<rating>.txt`. "
                    f"Received: path={root!r}"
                )
            names = sorted((n for n in os.listdir(folder) if n.endswith(".txt")), key=_sort_key)
            texts = []
            for name in names:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    texts.append(f.read())
            reviews[split][label] = texts
    return reviews


def read_archive(path):
    """Streams the reviews out of a `.tar.gz` without extracting it."""
    found = {split: {0: [], 1: []} for split in SPLITS}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                match = _MEMBER.search(member.name)
                if match is None or not member.isfile():
                    continue
                split, class_name, _ = match.groups()
                data = archive.extractfile(member).read()
                found[split][CLASS_NAMES.index(class_name)].append(
                    (_sort_key(member.name), data.decode("utf-8"))
                )
    except (tarfile.TarError, EOFError, OSError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(
            f"Could not read the IMDB archive {path!r}: it is corrupt or "
            f"incomplete ({type(e).__name__}: {_first_line(e)}). If it was downloaded, "
            "delete it and run again to download a fresh copy. "
            f"Received: path={path!r}"
        ) from e
    return {
        split: {label: [t for _, t in sorted(items)] for label, items in by_label.items()}
        for split, by_label in found.items()
    }


def extract(archive: str, directory: str) -> str:
    """Extracts an IMDB archive so that `directory/aclImdb/` appears complete or not at all.

    The archive is extracted into a temporary folder next to `directory` and
    renamed into place only after every member was read, so an interrupted or
    failed extraction leaves nothing half-extracted behind.

    Args:
        archive: Path of `aclImdb_v1.tar.gz`.
        directory: Folder that receives `aclImdb/`.

    Returns:
        The path of the extracted `aclImdb` folder.

    Example:

    >>> folder = extract("aclImdb_v1.tar.gz", "data")  # doctest: +SKIP
    >>> train, val, test = load_data(folder)  # doctest: +SKIP
    """
    target = os.path.join(directory, "aclImdb")
    if os.path.isdir(target):
        return target
    os.makedirs(directory, exist_ok=True)
    # Leftovers of killed extractions on this host go first; the work folder
    # is renamed into place only when complete, and never over a folder that a
    # concurrent extraction published meanwhile (that one is used instead).
    atomic_io.remove_stale_parts(directory, "aclImdb")
    tmp = atomic_io.temporary_directory(directory, "aclImdb")
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise ValueError(
                f"Could not extract the IMDB archive {archive!r}: it is corrupt "
                f"or incomplete ({type(e).__name__}: {_first_line(e)}). "
                f"Received: archive={archive!r}"
            ) from e
        read_folder(tmp)  # Raises if the archive lacks a split or a class.
        atomic_io.fsync_tree(os.path.join(tmp, "aclImdb"))
        try:
            atomic_io.rename_no_replace(os.path.join(tmp, "aclImdb"), target)
        except FileExistsError:
            if not os.path.isdir(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
