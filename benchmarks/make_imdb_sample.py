"""Regenerates the IMDB subsets shipped in the repository from the real archive.

Two subsets of Stanford's `aclImdb_v1.tar.gz`, both in its layout
(`aclImdb/{train,test}/{neg,pos}/<id>_<rating>.txt`) and drawn reproducibly
(seeded, balanced: the same number of reviews per split and class):

- `sample`: `keras_factorized/datasets/data/imdb_sample.tar.gz`, 1,000 reviews
  per split and class (4,000 in all, about 2 MB), the embedded default that
  `keras_factorized.datasets.imdb.load_imdb` falls back to when the full data
  is neither cached nor downloadable;
- `fixture`: `tests/data/imdb_fixture/aclImdb_mini.tar.gz`, 100 train and 50
  test reviews per class, for the tests.

The output bytes depend only on the source archive and the seed (tar and gzip
timestamps are zero), so a regenerated file is identical to the committed one.

    python benchmarks/make_imdb_sample.py --source aclImdb_v1.tar.gz [--subset fixture]
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import random
import re
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SOURCE = os.path.join(ROOT, "..", "shared", "data", "aclImdb_v1.tar.gz")
SUBSETS = {
    # name: (output path, reviews per class of train, of test)
    "sample": (
        os.path.join(ROOT, "keras_factorized", "datasets", "data", "imdb_sample.tar.gz"),
        1000,
        1000,
    ),
    "fixture": (
        os.path.join(ROOT, "tests", "data", "imdb_fixture", "aclImdb_mini.tar.gz"),
        100,
        50,
    ),
}
MEMBER = re.compile(r"aclImdb/(train|test)/(neg|pos)/[^/]+\.txt$")


def choose_members(source: str, per_class: dict, seed: int) -> set:
    """Names of `per_class[split]` reviews per split and class, drawn with `seed`."""
    members = {}
    with tarfile.open(source, "r:gz") as archive:
        for member in archive:
            match = MEMBER.match(member.name)
            if match and member.isfile():
                members.setdefault(match.groups(), []).append(member.name)
    rng = random.Random(seed)
    chosen = set()
    for (split, _), names in sorted(members.items()):
        chosen.update(rng.sample(sorted(names), per_class[split]))
    return chosen


def write_subset(source: str, output: str, per_class: dict, seed: int = 0) -> int:
    """Writes the chosen reviews of `source` to the `.tar.gz` `output`; returns their count."""
    chosen = choose_members(source, per_class, seed)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    buffer = io.BytesIO()
    with (
        tarfile.open(source, "r:gz") as archive,
        tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as out,
    ):
        for member in archive:
            if member.name in chosen:
                data = archive.extractfile(member).read()
                info = tarfile.TarInfo(member.name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                out.addfile(info, io.BytesIO(data))
    compressed = io.BytesIO()
    with gzip.GzipFile(fileobj=compressed, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(buffer.getvalue())
    from keras_factorized.atomic_io import write_bytes

    write_bytes(output, compressed.getvalue())
    return len(chosen)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=DEFAULT_SOURCE, help="Stanford's aclImdb_v1.tar.gz.")
    parser.add_argument("--subset", choices=sorted(SUBSETS), default="sample")
    parser.add_argument(
        "--output", default=None, help="Default: the subset's path in the repository."
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path, train, test = SUBSETS[args.subset]
    output = args.output or path
    count = write_subset(args.source, output, {"train": train, "test": test}, args.seed)
    print(f"Wrote {count:,} reviews to {output} ({os.path.getsize(output):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
