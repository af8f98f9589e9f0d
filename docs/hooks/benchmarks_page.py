"""MkDocs hook: the Benchmarks page is BENCHMARKS.md, as the commands wrote it.

`docs/benchmarks.md` is a stub; this hook replaces its content by the
repository's `BENCHMARKS.md` (every number there is written by a command in
`benchmarks/`), so the site never holds a second copy that could drift.
The benchmark commands ran in the project's own checkout, where the IMDB
archive lies in a data folder beside the repository; readers have the archive
wherever they downloaded it, so the page shows `--data aclImdb_v1.tar.gz`
(the file name alone). Nothing else changes.
"""

import os
import re

_DATA_FOLDER = re.compile(r"(?:\.\./)+shared/data/")


def on_page_markdown(markdown, page, config, **kwargs):
    if page.file.src_uri != "benchmarks.md":
        return markdown
    root = os.path.dirname(os.path.abspath(config.config_file_path))
    with open(os.path.join(root, "BENCHMARKS.md"), encoding="utf-8") as f:
        return _DATA_FOLDER.sub("", f.read())
