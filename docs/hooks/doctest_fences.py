"""Griffe extension: render Keras-style `>>>` examples as code blocks.

Keras docstrings write their examples flush with the text, after an
`Example:` line, where Google-style parsers expect an indented section:

    Example:

    >>> layer = LowRankDense(4, rank=2)

Unchanged, Markdown would render the prompts as nested quotes and read doctest
output such as `[(16, 6)]` as link references. This extension wraps each run
of top-level `>>>` lines (with their `...` continuations and expected output,
up to the next blank line) in a `pycon` code fence before the docstring is
parsed. The docstrings themselves stay plain doctests.
"""

from __future__ import annotations

import griffe


def fence_doctests(text: str) -> str:
    """Wraps every top-level doctest run of `text` in a ```` ```pycon ```` fence."""
    out: list[str] = []
    in_fence = in_example = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        if not in_fence and not in_example and line.startswith(">>>"):
            out.append("```pycon")
            in_example = True
        elif in_example and not line.strip():
            out.append("```")
            in_example = False
        out.append(line)
    if in_example:
        out.append("```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    """Fences the doctest examples of every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
