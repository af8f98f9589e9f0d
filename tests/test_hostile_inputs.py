"""Hostile and broken inputs at every entry point: a clear error, nothing written.

Model files that are truncated, corrupt, crafted to import a module, or name
unknown classes or wrong weight shapes; token ids out of range; NaN/Inf
weights; empty or corrupt IMDB archives; GloVe files with bad lines. The
library raises a `ValueError`/`TypeError` naming the problem, and the command
line exits with status 2 and one line on stderr, leaving no output behind.
"""

import io
import json
import os
import sys
import tarfile
import zipfile

import keras
import numpy as np
import pytest

from keras_factorized import FactorizedEmbedding
from keras_factorized import LowRankDense
from keras_factorized.datasets import imdb
from keras_factorized.word_vectors import load_word_vectors

EVIL_MODULE = "kf_hostile_marker_module"


def cli(args, capsys):
    """Runs the command line in-process: (exit code, stderr lines)."""
    from keras_factorized.cli import main

    code = main([str(a) for a in args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def assert_usage_error(code, err, *fragments):
    assert code == 2, err
    assert len(err) == 1, err
    for fragment in fragments:
        assert fragment in err[0], err


def small_model():
    inputs = keras.Input((6,), dtype="int32")
    x = FactorizedEmbedding(20, 8, rank=4, name="embedding")(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Dense(8, name="dense")(x)
    return keras.Model(inputs, LowRankDense(1, rank=1, name="head")(x))


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "model.keras"
    small_model().save(path)
    return path


def rewrite_archive(source, target, edit_config=None, drop=()):
    """Copies a `.keras` archive, editing its config.json or dropping members."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            if item.filename in drop:
                continue
            data = old.read(item.filename)
            if item.filename == "config.json" and edit_config is not None:
                data = json.dumps(edit_config(json.loads(data))).encode()
            new.writestr(item, data)


# ---------------------------------------------------------------------------
# Safe loading (issue 14, problem 2)


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """A module that, if ever imported, writes a marker file."""
    folder = tmp_path / "site"
    folder.mkdir()
    marker = tmp_path / "IMPORTED"
    (folder / f"{EVIL_MODULE}.py").write_text(
        f"open({str(marker)!r}, 'w').write('code ran')\n"
        "import keras\n"
        "class Evil(keras.Model):\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop(EVIL_MODULE, None)
    yield marker
    sys.modules.pop(EVIL_MODULE, None)


def crafted_archive(path, module=EVIL_MODULE, class_name="Evil", registered_name=None):
    """A `.keras` file whose factorized-model config names `module`."""
    config = {
        "module": None,
        "class_name": "FactorizedModel",
        "registered_name": "keras_factorized>FactorizedModel",
        "config": {
            "base": {"module": module, "class_name": class_name,
                     "registered_name": registered_name or f"{module}>{class_name}"},
            "config": {"name": "evil", "trainable": True},
            "keras_factorized_plan": [],
        },
    }
    metadata = {"keras_version": keras.__version__, "date_saved": "2026-01-01@00:00:00"}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps(config))
        archive.writestr("metadata.json", json.dumps(metadata))
        archive.writestr("model.weights.h5", b"")
    return path


@pytest.mark.parametrize("safe_mode", [True, False])
def test_crafted_archive_does_not_import_the_module_it_names(tmp_path, evil_module, safe_mode):
    # Was: `importlib.import_module(config["module"])` ran the module's code.
    path = crafted_archive(tmp_path / "crafted.keras")
    with pytest.raises(ValueError, match=rf"class `Evil` of module `{EVIL_MODULE}`"):
        keras.saving.load_model(path, safe_mode=safe_mode)
    assert not evil_module.exists()
    assert EVIL_MODULE not in sys.modules


def test_crafted_archive_in_the_cli_is_one_line_exit_2(tmp_path, evil_module, capsys):
    path = crafted_archive(tmp_path / "crafted.keras")
    code, err = cli(["inspect", path], capsys)
    assert_usage_error(code, err, "Evil", EVIL_MODULE)
    assert not evil_module.exists()


@pytest.mark.parametrize(
    "module, class_name, registered_name, fragment",
    [
        ("os", "system", None, "neither registered nor part of Keras"),
        ("keras.src.saving.serialization_lib", "deserialize_keras_object", None,
         "not a Keras layer"),
        # Registered, but not a layer (and loading it would recurse).
        ("keras_factorized.surgery.saving", "FactorizedModelLoader",
         "keras_factorized>FactorizedModel", "not a Keras layer"),
        ("keras.src.models.no_such_module", "Model", None, "cannot be imported"),
        ("../../etc", "passwd", None, "not a valid class reference"),
    ],
)
def test_classes_outside_the_registry_and_keras_are_refused(
    tmp_path, module, class_name, registered_name, fragment
):
    path = crafted_archive(tmp_path / "crafted.keras", module, class_name, registered_name)
    with pytest.raises(ValueError, match=fragment):
        keras.saving.load_model(path)


def test_a_registered_class_still_loads(tmp_path):
    from keras_factorized.surgery import saving

    config = {
        "base": saving.class_reference(keras.Sequential),
        "config": keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).get_config(),
        "keras_factorized_plan": [],
    }
    assert isinstance(saving.FactorizedModelLoader.from_config(config), keras.Sequential)


# ---------------------------------------------------------------------------
# Broken model files


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "no_config", "no_weights"])
def test_broken_model_file_is_a_one_line_error_and_writes_nothing(tmp_path, saved, damage, capsys):
    broken = tmp_path / "broken.keras"
    data = saved.read_bytes()
    if damage == "truncated":
        broken.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        broken.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "empty":
        broken.write_bytes(b"")
    elif damage == "no_config":
        rewrite_archive(saved, broken, drop=("config.json",))
    else:
        rewrite_archive(saved, broken, drop=("model.weights.h5",))
    output = tmp_path / "small.keras"
    code, err = cli(["compress", broken, "-o", output, "--rank", "2", "-q"], capsys)
    assert_usage_error(code, err, "broken.keras")
    assert not output.exists()
    assert sorted(os.listdir(tmp_path)) == ["broken.keras", "model.keras"]


def _rename_class(config):
    config["config"]["layers"][1]["class_name"] = "NoSuchLayer"
    config["config"]["layers"][1]["registered_name"] = "keras_factorized>NoSuchLayer"
    return config


def _change_rank(config):
    config["config"]["layers"][1]["config"]["rank"] = 3  # The weights have rank 4.
    return config


@pytest.mark.parametrize("edit", [_rename_class, _change_rank])
def test_unknown_class_or_wrong_weight_shapes_exit_2(tmp_path, saved, edit, capsys):
    broken = tmp_path / "edited.keras"
    rewrite_archive(saved, broken, edit_config=edit)
    with pytest.raises((ValueError, TypeError)):
        keras.saving.load_model(broken)
    output = tmp_path / "small.keras"
    code, err = cli(["compress", broken, "-o", output, "--rank", "2", "-q"], capsys)
    assert_usage_error(code, err, "edited.keras")
    assert not output.exists()


def test_nan_weights_are_refused_and_nothing_written(tmp_path, capsys):
    model = small_model()
    weights = model.get_layer("dense").get_weights()
    weights[0][0, 0] = np.nan
    model.get_layer("dense").set_weights(weights)
    source, output = tmp_path / "nan.keras", tmp_path / "small.keras"
    model.save(source)
    code, err = cli(["compress", source, "-o", output, "--rank", "2", "-q"], capsys)
    assert_usage_error(code, err, "NaN or Inf")
    assert not output.exists()


@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_matrix_is_refused_by_the_layers(poison):
    matrix = np.ones((10, 4))
    matrix[3, 1] = poison
    with pytest.raises(ValueError, match="finite values"):
        FactorizedEmbedding.from_matrix(matrix, rank=2)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="JAX gathers clamp out-of-range ids instead of raising")
@pytest.mark.parametrize("bad_id", [
    20,
    1000,
    pytest.param(-1, marks=pytest.mark.xfail(
        strict=True, reason="negative ids wrap around (take) on every backend: the "
        "last row is returned without an error")),
])
def test_token_ids_out_of_range_raise(bad_id):
    layer = FactorizedEmbedding(20, 8, rank=4)
    ids = np.array([[1, 2, bad_id]], dtype="int32")
    with pytest.raises(Exception, match=r"(?i)out of range|not in \[0, 20\)|indices"):
        keras.ops.convert_to_numpy(layer(ids))


# ---------------------------------------------------------------------------
# IMDB archives


def _tar_gz(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated", "no_test_split"])
def test_broken_imdb_archive_is_a_clear_error_and_extracts_nothing(tmp_path, kind):
    members = {
        f"aclImdb/{split}/{label}/{i}_7.txt": f"review {split} {label} {i}"
        for split in ("train", "test") for label in ("pos", "neg") for i in range(3)
    }
    if kind == "empty":
        data = b""
    elif kind == "garbage":
        data = np.random.default_rng(1).bytes(2048)
    elif kind == "truncated":
        data = _tar_gz(members)[:-200]
    else:
        data = _tar_gz({k: v for k, v in members.items() if "/test/" not in k})
    archive = tmp_path / "aclImdb_v1.tar.gz"
    archive.write_bytes(data)
    with pytest.raises(ValueError, match="test/neg" if kind == "no_test_split" else "aclImdb_v1"):
        imdb.read_reviews(str(archive))
    target = tmp_path / "data"
    # A missing split is named ("test/neg"); damage names the archive.
    expected = "test/neg" if kind == "no_test_split" else "aclImdb_v1.tar.gz"
    with pytest.raises(ValueError, match=expected):
        imdb.extract(str(archive), str(target))
    assert not (target / "aclImdb").exists()
    assert [n for n in os.listdir(target) if not n.startswith(".")] == []
    assert os.listdir(target) == []  # No half-extracted temporary left either.


def test_broken_imdb_archive_in_the_cli_exit_2_writes_nothing(tmp_path, capsys):
    archive = tmp_path / "aclImdb_v1.tar.gz"
    archive.write_bytes(b"not a tar file")
    output = tmp_path / "out"
    code, err = cli(["imdb", "--data", archive, "--output-dir", output, "--epochs", "1"], capsys)
    assert_usage_error(code, err, "aclImdb_v1.tar.gz")
    assert not output.exists() or os.listdir(output) == []


# ---------------------------------------------------------------------------
# GloVe / word2vec files


VOCAB = ["", "[UNK]", "good", "bad", "film"]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("good 1.0 2.0\nbad 1.0 oops\n", "line 2"),
        ("good 1.0 2.0\nbad 1.0 2.0 3.0\n", "line 2"),
        ("good 1.0 nan\n", "line 1"),
        ("good 1.0 2.0\nbad inf 2.0\n", "line 2"),
        ("good 1.0 2.0\nbad \n", "line 2"),
        ("good\n", "line 1"),
        ("", "No word of the vocabulary"),
        ("3 2\n", "No word of the vocabulary"),
        ("other 1.0 2.0\n", "No word of the vocabulary"),
    ],
)
def test_glove_file_with_bad_lines_is_a_clear_error(tmp_path, text, fragment):
    path = tmp_path / "vectors.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"(?i){fragment}"):
        load_word_vectors(str(path), VOCAB)


def test_glove_binary_garbage_is_a_clear_error(tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_bytes(b"good \xff\xfe\x00\x01 2.0\n")
    with pytest.raises(ValueError, match="Line 1"):
        load_word_vectors(str(path), VOCAB)


def test_glove_lines_of_other_words_are_never_parsed(tmp_path):
    # Bad lines of words outside the vocabulary cost nothing and raise nothing.
    path = tmp_path / "vectors.txt"
    path.write_text("good 1.0 2.0\nunused not numbers at all\nbad 3.0 4.0\n")
    vectors = load_word_vectors(str(path), VOCAB)
    assert vectors.oov == ["film"]
    np.testing.assert_array_equal(vectors.matrix[3], [3.0, 4.0])
