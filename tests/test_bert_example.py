"""Smoke run of examples/bert_reparameterize/bert_reparameterize.py on a tiny BERT preset.

The example's default model (all-MiniLM-L6-v2) ships in an optional pip
package; here a tiny randomly initialised BERT saved as a KerasHub preset
goes through the same code path, offline.
"""

import importlib.util
import os

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

from tiny_models import save_tiny_preset  # noqa: E402

from keras_factorized import LowRankEinsumDense  # noqa: E402
from keras_factorized import _keras_compat  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(os.path.dirname(HERE), "examples", "bert_reparameterize", "bert_reparameterize.py")
WORDS = "a the film plot story acting good bad great painful moving one best years director ending".split()


@pytest.fixture
def tiny_bert_preset(tmp_path):
    return save_tiny_preset(tmp_path / "tiny_bert", 32, WORDS + [".", ","])


def test_example_runs_every_method_and_round_trips(tiny_bert_preset, capsys):
    spec = importlib.util.spec_from_file_location("bert_reparameterize", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = ["--model-dir", tiny_bert_preset, "--sequence-length", "16", "--param-ratio", "0.5",
            "--calibration", "8", "--eval", "8"]  # reviews: the sample shipped in the package
    cosine, method, small = example.main(argv)
    out = capsys.readouterr().out
    assert "IMDB reviews from the embedded sample" in out
    for name in ("svd", "whitened", "learned"):
        assert f"{name}: parameter ratio" in out
    assert "loads back with the same outputs: True" in out
    assert method in ("svd", "whitened", "learned")
    assert -1.0 <= cosine <= 1.0 and np.isfinite(cosine)
    factorized = [layer for layer in _keras_compat.flatten_layers(small, include_self=True) if isinstance(layer, LowRankEinsumDense)]
    # Q, K and V of both layers are selected; the allocation may keep some
    # whole (at their break-even rank), and the report says which.
    assert factorized and {layer.name for layer in factorized} <= {"query", "key", "value"}
    rows = small.factorization_report.layers
    assert len(rows) == 2 * 3
    assert sum(row.rank is not None for row in rows) == len(factorized)
    assert all(row.replacement or row.note for row in rows)
