"""Regenerates `tests/data/imdb_fixture/aclImdb_mini.tar.gz` from the real IMDB archive.

A few hundred real reviews, sampled reproducibly, in the layout of Stanford's
release (`aclImdb/{train,test}/{neg,pos}/<id>_<rating>.txt`), so that the loader,
the example and its plot run in seconds in CI without `../shared`.

    python tests/data/make_imdb_fixture.py [--source ../shared/data/aclImdb_v1.tar.gz]
"""

import argparse
import io
import os
import random
import re
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SOURCE = os.path.join(HERE, "..", "..", "..", "shared", "data", "aclImdb_v1.tar.gz")
OUTPUT = os.path.join(HERE, "imdb_fixture", "aclImdb_mini.tar.gz")
PER_CLASS = {"train": 100, "test": 50}
MEMBER = re.compile(r"aclImdb/(train|test)/(neg|pos)/[^/]+\.txt$")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=DEFAULT_SOURCE)
    parser.add_argument("--output", default=OUTPUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    members = {}
    with tarfile.open(args.source, "r:gz") as archive:
        for member in archive:
            match = MEMBER.match(member.name)
            if match and member.isfile():
                members.setdefault(match.groups(), []).append(member.name)
    rng = random.Random(args.seed)
    chosen = set()
    for (split, _), names in sorted(members.items()):
        chosen.update(rng.sample(sorted(names), PER_CLASS[split]))

    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    tmp = args.output + ".part"
    with tarfile.open(args.source, "r:gz") as archive, tarfile.open(
        tmp, "w:gz", format=tarfile.PAX_FORMAT
    ) as out:
        for member in archive:
            if member.name in chosen:
                data = archive.extractfile(member).read()
                info = tarfile.TarInfo(member.name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                out.addfile(info, io.BytesIO(data))
    os.replace(tmp, args.output)
    print(f"Wrote {len(chosen)} reviews to {args.output} ({os.path.getsize(args.output):,} bytes)")


if __name__ == "__main__":
    main()
