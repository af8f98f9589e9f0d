"""Tests of the `keras-factorized` command line, through its entry points.

Most tests call `main([...])` in-process (fast); a few run the installed
console script and `python -m keras_factorized` as real subprocesses to check
the exit status and the one-line error on stderr.
"""

import argparse
import doctest
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import warnings
import zipfile

import keras
import numpy as np
import pytest

from keras_factorized import cli
from keras_factorized import reporting
from keras_factorized import spectrum

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TF_ONLY = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="SavedModel export needs TensorFlow"
)
IMDB_FIXTURE = os.path.join(
    os.path.dirname(__file__), "data", "imdb_fixture", "aclImdb_mini.tar.gz"
)


def _has_surgery():
    try:
        from keras_factorized.surgery import factorize  # noqa: F401
    except ImportError:
        return False
    return True


needs_surgery = pytest.mark.skipif(
    not _has_surgery(), reason="keras_factorized.surgery.factorize not available"
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Tiny models saved as .keras, and their data.

    `tiny.keras`: Embedding + LSTM + Dense (compiled, untrained: the commands
    only read its weights). `pooled.keras`: Embedding + pooling + Dense,
    trained a little (cheap to compile on every backend), for `sweep`.
    """
    folder = tmp_path_factory.mktemp("cli")
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(1, 60, size=(160, 10)).astype("int32")
    y = (x[:, 0] > 30).astype("int32")
    model = keras.Sequential(
        [
            keras.Input((10,), dtype="int32"),
            keras.layers.Embedding(60, 16, name="embedding"),
            keras.layers.LSTM(8, name="lstm"),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dense(1, activation="sigmoid", name="out"),
        ]
    )
    model.compile("adam", "binary_crossentropy", metrics=["accuracy"])
    model.save(folder / "tiny.keras")
    pooled = keras.Sequential(
        [
            keras.Input((10,), dtype="int32"),
            keras.layers.Embedding(60, 16, name="embedding"),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dense(1, activation="sigmoid", name="out"),
        ]
    )
    pooled.compile(keras.optimizers.Adam(0.01), "binary_crossentropy", metrics=["accuracy"])
    pooled.fit(x[:120], y[:120], epochs=5, batch_size=32, verbose=0)
    pooled.save(folder / "pooled.keras")
    np.savez(folder / "data.npz", x=x[:120], y=y[:120], x_val=x[120:], y_val=y[120:])
    return folder


def _run(capsys, argv):
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(err, *fragments):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error:" in lines[0] and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _no_leftovers(folder, keep=()):
    """Names in `folder` other than `keep` (temporary files left behind)."""
    return sorted(set(os.listdir(folder)) - set(keep))


# ---------------------------------------------------------------- help / usage


@pytest.mark.parametrize("command", ["inspect", "compress", "export", "sweep", "imdb"])
def test_help_of_every_command(capsys, command):
    code, out, _ = _run(capsys, [command, "--help"])
    assert code == 0
    # imdb forwards its arguments, --help included, to the example's parser.
    assert out.startswith("usage: " if command == "imdb" else f"usage: keras-factorized {command}")
    assert "(default:" in out


def test_help_lists_commands_and_flag_defaults(capsys):
    code, out, _ = _run(capsys, ["--help"])
    assert code == 0
    for command in ("inspect", "compress", "export", "imdb", "sweep"):
        assert command in out
    _, out, _ = _run(capsys, ["sweep", "--help"])
    assert "(default: 4,8,16,32)" in out and "(default: 64)" in out
    _, out, _ = _run(capsys, ["compress", "--help"])
    assert "(default: svd)" in out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        ([], "COMMAND"),
        (["nope"], "invalid choice"),
        (["compress", "m.keras", "-o", "o.keras", "--rank", "0"], "--rank"),
        (["compress", "m.keras", "-o", "o.keras", "--rank", "2.5"], "--rank"),
        (["compress", "m.keras", "-o", "o.keras", "--param-ratio", "1.5"], "--param-ratio"),
        (["compress", "m.keras", "-o", "o.keras", "--rank", "4", "--energy", "0.9"], "not allowed"),
        (["compress", "m.keras", "-o", "o.keras"], "one of the arguments"),
        (["compress", "m.keras", "-o", "o.keras", "--rank", "4", "--include", "("], "--include"),
        (["sweep", "m.keras", "--data", "d.npz", "--ranks", "4,x"], "--ranks"),
        (["inspect", "m.keras", "--energy-levels", "0.9,2"], "--energy-levels"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, argv, fragment):
    code, out, err = _run(capsys, argv)
    assert code == 2
    _assert_one_line_error(err, fragment)


# TensorFlow's C++ runtime logs a few lines on import whatever TF_CPP_MIN_LOG_LEVEL
# says ("WARNING: All log messages before absl::InitializeLog()...", "I0000 ...");
# those are TensorFlow's, not ours.
_TF_LOG_LINE = re.compile(r"^(WARNING: All log messages before absl|[IWEF]\d{4} )")


def _own_stderr_lines(stderr):
    return [line for line in stderr.splitlines() if not _TF_LOG_LINE.match(line)]


def _console_script():
    candidate = os.path.join(os.path.dirname(sys.executable), "keras-factorized")
    return candidate if os.path.exists(candidate) else shutil.which("keras-factorized")


@pytest.mark.skipif(_console_script() is None, reason="console script not installed")
def test_console_script_bad_argument_exits_2_with_one_line(tmp_path):
    done = subprocess.run(
        [_console_script(), "compress", str(tmp_path / "m.keras"), "-o", "o.keras", "--rank", "-3"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert done.returncode == 2 and done.stdout == ""
    assert _own_stderr_lines(done.stderr) == [
        "keras-factorized compress: error: argument --rank: expected a positive "
        "integer, received '-3' (see `keras-factorized compress --help`)"
    ]


def test_python_dash_m(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["keras_factorized", "inspect", str(tmp_path / "none.keras")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("keras_factorized", run_name="__main__")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"keras-factorized inspect: error: model file not found: {tmp_path / 'none.keras'}"
    ]


# ---------------------------------------------------------------- bad model files


@pytest.mark.parametrize("command", ["inspect", "compress", "export", "sweep"])
def test_bad_model_file(capsys, tmp_path, command):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 10)), y=np.zeros(4))
    extra = {
        "inspect": [],
        "compress": ["-o", tmp_path / "out.keras", "--rank", "2"],
        "export": [tmp_path / "export"],
        "sweep": ["--data", tmp_path / "d.npz"],
    }[command]
    (tmp_path / "text.keras").write_text("not a model")
    with zipfile.ZipFile(tmp_path / "zip.keras", "w") as archive:
        archive.writestr("hello.txt", "hi")
    (tmp_path / "folder.keras").mkdir()
    for name, expected in [
        ("missing.keras", "not found"),
        ("text.keras", "not a Keras model"),
        ("zip.keras", "not a Keras model"),
        ("folder.keras", "not a Keras model"),
    ]:
        path = tmp_path / name
        code, _, err = _run(capsys, [command, path, *extra])
        assert code == 2, name
        _assert_one_line_error(err, expected, str(path))
        assert not (tmp_path / "out.keras").exists()
        assert not (tmp_path / "export").exists()


def test_unreadable_model(capsys, tmp_path, workdir, monkeypatch):
    path = tmp_path / "locked.keras"
    shutil.copy(workdir / "tiny.keras", path)
    real_access = os.access
    # chmod 000 does not stop root (CI containers), so the check is faked.
    monkeypatch.setattr(
        cli.os, "access",
        lambda p, mode: False if os.fspath(p) == str(path) else real_access(p, mode),
    )
    code, _, err = _run(capsys, ["inspect", path])
    assert code == 2
    _assert_one_line_error(err, "not readable", str(path))


def test_corrupt_keras_archive(capsys, tmp_path):
    path = tmp_path / "broken.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", "{not json")
        archive.writestr("metadata.json", "{}")
    code, _, err = _run(capsys, ["inspect", path])
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(
        f"keras-factorized inspect: error: cannot load {path} as a Keras model"
    )
    assert "Traceback" not in err


# ---------------------------------------------------------------- inspect


def test_inspect_table_json_and_png(capsys, workdir, tmp_path):
    png, out_json = tmp_path / "spectra.png", tmp_path / "spectra.json"
    code, out, err = _run(capsys, ["inspect", workdir / "tiny.keras", "--plot", png, "--json", out_json])
    assert code == 0, err
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("layer"))
    assert "rank@90% (saving)" in header and "rank@99% (saving)" in header
    table = {line.split()[0]: line.split() for line in lines if line.split()}
    assert table["embedding"][1:5] == ["Embedding", "60x16", "960", f"{960 * 4:,}"]
    assert table["hidden"][1:5] == ["Dense", "8x16", "128", f"{(128 + 16) * 4:,}"]
    assert "lstm" not in table  # LSTM kernels are not factorized.
    assert table["total"][1:3] == [f"{960 + 128 + 16:,}", f"{(960 + 144 + 17) * 4:,}"]

    rows = json.loads(out_json.read_text())
    assert [r["path"] for r in rows] == ["embedding", "hidden", "out"]
    emb = keras.saving.load_model(workdir / "tiny.keras").get_layer("embedding")
    s = np.linalg.svd(keras.ops.convert_to_numpy(emb.embeddings), compute_uv=False)
    np.testing.assert_allclose(rows[0]["singular_values"], s, rtol=1e-4)
    energy = np.cumsum(s**2) / np.sum(s**2)
    for level in rows[0]["levels"]:
        expected_rank = int(np.argmax(energy >= level["energy"] - 1e-12)) + 1
        assert level["rank"] == expected_rank
        assert level["params"] == (60 + 16) * expected_rank
        assert level["saving"] == pytest.approx(1 - (60 + 16) * expected_rank / 960)

    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert _no_leftovers(tmp_path, keep=["spectra.png", "spectra.json"]) == []


def test_inspect_plot_failure_leaves_no_file(capsys, workdir, tmp_path, monkeypatch):
    import matplotlib.figure

    def broken_savefig(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(PNG_SIGNATURE[:4])  # half a file...
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    png = tmp_path / "spectra.png"
    code, _, err = _run(capsys, ["inspect", workdir / "tiny.keras", "--plot", png, "-q"])
    assert code == 1
    _assert_one_line_error(err, "No space left on device")
    assert os.listdir(tmp_path) == []


def test_inspect_missing_output_folder(capsys, workdir, tmp_path):
    code, _, err = _run(capsys, ["inspect", workdir / "tiny.keras", "--plot", tmp_path / "no" / "x.png"])
    assert code == 2
    _assert_one_line_error(err, "output folder does not exist")


def test_spectrum_of_factorized_layers_matches_product():
    from keras_factorized import FactorizedEmbedding
    from keras_factorized import LowRankDense

    inputs = keras.Input((6,), dtype="int32")
    h = FactorizedEmbedding(40, 12, rank=3, name="fe")(inputs)
    h = keras.layers.EinsumDense("abc,cde->abde", output_shape=(6, 2, 4), name="ed")(h)
    h = keras.layers.Reshape((6, 8))(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    outputs = LowRankDense(5, rank=2, name="lrd")(h)
    model = keras.Model(inputs, outputs)
    rows = {row["path"].split("/")[-1]: row for row in spectrum.inspect_model(model)}

    fe = model.get_layer("fe")
    merged = keras.ops.convert_to_numpy(fe.embeddings_a) @ keras.ops.convert_to_numpy(fe.embeddings_b)
    np.testing.assert_allclose(
        rows["fe"]["singular_values"],
        np.linalg.svd(merged, compute_uv=False)[:3], rtol=1e-4, atol=1e-6,
    )
    assert rows["fe"]["shape"] == (40, 12) and rows["fe"]["rank"] == 3
    assert rows["fe"]["params"] == 40 * 3 + 3 * 12
    assert rows["lrd"]["shape"] == (8, 5) and rows["lrd"]["rank"] == 2
    kernel = keras.ops.convert_to_numpy(model.get_layer("ed").kernel)  # (12, 2, 4)
    np.testing.assert_allclose(
        rows["ed"]["singular_values"],
        np.linalg.svd(kernel.reshape(12, 8), compute_uv=False), rtol=1e-4,
    )
    # A factorized layer keeping all its energy at its own rank saves nothing.
    assert rows["fe"]["levels"][-1]["rank"] <= 3
    assert rows["fe"]["levels"][-1]["saving"] >= 0


@needs_surgery
def test_inspect_and_compress_agree_on_every_layer(capsys, tmp_path):
    keras_hub = pytest.importorskip("keras_hub")
    from keras_factorized import factorize

    inputs = keras.Input((6,), dtype="int32")
    tokens = keras_hub.layers.ReversibleEmbedding(50, 16, name="tokens")
    h = keras.layers.Dense(16, name="hidden")(tokens(inputs))
    h = keras.layers.EinsumDense("abc,cd->abd", output_shape=(6, 8), name="proj")(h)
    h = keras.layers.Dense(16, name="back")(h)
    model = keras.Model(inputs, tokens(h, reverse=True))
    model.save(tmp_path / "tied.keras")

    rows = {row["path"]: row for row in spectrum.inspect_model(model)}
    report = {r.path: r for r in factorize(model, rank=2).factorization_report.layers}
    assert sorted(rows) == sorted(report) == ["back", "hidden", "proj", "tokens"]
    for path, row in rows.items():
        if row["note"]:  # kept, for the same reason
            assert report[path].rank is None and report[path].note == row["note"], path
        else:
            assert report[path].rank == 2 and row["levels"], path
    assert "ReversibleEmbedding" in rows["tokens"]["note"]
    assert rows["tokens"]["levels"] == [] and rows["tokens"]["shape"] == (50, 16)

    code, out, err = _run(capsys, ["inspect", tmp_path / "tied.keras", "-q"])
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("tokens"))
    assert rows["tokens"]["note"] in line and "%" not in line
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert total.split()[1] == f"{50 * 16 + 16 * 16 + 16 * 8 + 8 * 16:,}"
    # Every level keeps the ReversibleEmbedding whole.
    level_totals = [int(t.replace(",", "")) for t in re.findall(r"([\d,]+) \(", total)]
    assert len(level_totals) == 3 and min(level_totals) >= 800


def test_matricize_einsum_kernel_orders_axes():
    kernel = np.arange(2 * 3 * 4).reshape(3, 2, 4).astype(float)  # axes d, c, e
    matrix = spectrum.matricize_einsum_kernel(kernel, "abc,dce->abde")
    # Contracted axis c (kernel axis 1) first, then output axes d, e.
    assert matrix.shape == (2, 12)
    np.testing.assert_array_equal(matrix[1], np.transpose(kernel, (1, 0, 2))[1].ravel())
    assert spectrum.matricize_einsum_kernel(np.zeros((3, 4)), "abc,bc->abc") is None


# ---------------------------------------------------------------- compress


@needs_surgery
def test_compress_writes_smaller_model(capsys, workdir, tmp_path):
    out = tmp_path / "small.keras"
    code, stdout, err = _run(
        capsys, ["compress", workdir / "tiny.keras", "-o", out, "--rank", "4", "-q"]
    )
    assert code == 0, err
    assert f"Wrote {out}" in stdout and "Model parameters:" in stdout
    assert "Factorization (svd, rank 4):" in stdout  # factorize's report
    original = keras.saving.load_model(workdir / "tiny.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. optimizer slots that do not fit
        small = keras.saving.load_model(out)
    assert small.count_params() < original.count_params()
    assert type(small.get_layer("embedding")).__name__ == "FactorizedEmbedding"
    assert _no_leftovers(tmp_path, keep=["small.keras"]) == []
    # The output exists now: a second run must not replace it silently.
    code, _, err = _run(capsys, ["compress", workdir / "tiny.keras", "-o", out, "--rank", "4"])
    assert code == 2
    _assert_one_line_error(err, "--overwrite")


@needs_surgery
def test_compress_include_regex(capsys, workdir, tmp_path):
    out = tmp_path / "small.keras"
    code, _, err = _run(
        capsys,
        ["compress", workdir / "tiny.keras", "-o", out, "--rank", "2", "--include", "^embedding$", "-q"],
    )
    assert code == 0, err
    small = keras.saving.load_model(out)
    assert type(small.get_layer("embedding")).__name__ == "FactorizedEmbedding"
    assert type(small.get_layer("hidden")).__name__ == "Dense"


@needs_surgery
def test_compress_failed_save_leaves_nothing(capsys, workdir, tmp_path, monkeypatch):
    def broken_save(self, filepath, *args, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"PK\x03\x04 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keras.Model, "save", broken_save)
    out = tmp_path / "small.keras"
    code, _, err = _run(capsys, ["compress", workdir / "tiny.keras", "-o", out, "--rank", "4", "-q"])
    assert code == 1
    _assert_one_line_error(err, "No space left")
    assert os.listdir(tmp_path) == []


@needs_surgery
def test_compress_never_replaces_a_file_created_meanwhile(capsys, workdir, tmp_path, monkeypatch):
    out = tmp_path / "small.keras"
    real_save = keras.Model.save

    def racing_save(self, filepath, *args, **kwargs):
        out.write_text("another writer's file")  # appears while we save
        return real_save(self, filepath, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save", racing_save)
    code, _, err = _run(capsys, ["compress", workdir / "tiny.keras", "-o", out, "--rank", "4", "-q"])
    assert code == 2
    _assert_one_line_error(err, "--overwrite")
    assert out.read_text() == "another writer's file"
    assert os.listdir(tmp_path) == ["small.keras"]


def test_choices_and_defaults_come_from_the_library():
    from keras_factorized import decomposition
    from keras_factorized import surgery
    from keras_factorized.cli import compress_command

    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    actions = {a.dest: a for a in subparsers.choices["compress"]._actions}
    assert tuple(actions["method"].choices) == surgery.METHODS
    assert tuple(actions["allocation"].choices) == surgery.ALLOCATIONS
    assert tuple(actions["split"].choices) == decomposition.SPLITS
    assert actions["distillation_epochs"].default == surgery.DistillationConfig().epochs
    assert actions["damping"].default == surgery.WhitenedConfig().damping
    for descriptions, choices in [
        (compress_command.METHOD_HELP, surgery.METHODS),
        (compress_command.ALLOCATION_HELP, surgery.ALLOCATIONS),
        (compress_command.SPLIT_HELP, decomposition.SPLITS),
    ]:
        assert set(choices) <= set(descriptions)  # every choice explained
    # learned distils the whole model's outputs, not each layer's.
    assert "whole model's outputs" in actions["method"].help
    assert "layer outputs" not in actions["method"].help


def test_every_config_option_has_a_flag_with_help():
    """Each option of `WhitenedConfig` and `DistillationConfig` is a flag of
    `compress` (or set by another flag), with the library's default and help."""
    import dataclasses

    from keras_factorized import surgery
    from keras_factorized.cli import compress_command
    from keras_factorized.surgery import config
    from keras_factorized.surgery import report

    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    actions = {a.dest: a for a in subparsers.choices["compress"]._actions}
    for cls, flags in [
        (surgery.WhitenedConfig, compress_command.WHITENING_FLAGS),
        (surgery.DistillationConfig, compress_command.DISTILLATION_FLAGS),
    ]:
        for field in dataclasses.fields(cls):
            assert field.name in flags, f"{cls.__name__}.{field.name} has no compress flag"
            if flags[field.name] is None:
                continue
            action = actions[flags[field.name][0].lstrip("-").replace("-", "_")]
            assert action.default == getattr(cls(), field.name)
            assert len(action.help) > 20 and field.name.replace("_", " ") != action.help
    assert actions["seed"].default == surgery.DistillationConfig().seed
    assert actions["batch_size"].default == 32
    trainable = actions["distillation_trainable"]
    assert tuple(trainable.choices) == config.DISTILLATION_TRAINABLE
    for descriptions, choices in [
        (compress_command.TRAINABLE_HELP, config.DISTILLATION_TRAINABLE),
        (report.REPORT_FORMATS, tuple(report.REPORT_FORMATS)),
    ]:
        assert set(choices) <= set(descriptions)  # every choice explained
        for choice in choices:
            assert descriptions[choice]
    for choice in report.REPORT_FORMATS:
        assert choice in actions["report"].help


def test_field_help_reads_each_option_of_a_docstring():
    from keras_factorized.cli import _common

    class Options:
        """Options.

        Args:
            first: one line.
            second: two
                lines.

        Example:

        >>> 1
        """

    assert _common.field_help(Options, "first") == "one line."
    assert _common.field_help(Options, "second") == "two lines."
    assert _common.field_help(Options, "third_one") == "third one"


@needs_surgery
def test_compress_learned_with_calibration(capsys, workdir, tmp_path):
    x = np.load(workdir / "data.npz")["x"][:64]
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "small.keras"
    code, stdout, err = _run(
        capsys,
        ["compress", workdir / "pooled.keras", "-o", out, "--rank", "2", "--method", "learned",
         "--calibration", tmp_path / "x.npy", "--distillation-epochs", "1", "--split", "left",
         "--include", "hidden", "-q"],
    )
    assert code == 0, err
    assert "Factorization (learned, rank 2" in stdout
    small = keras.saving.load_model(out)
    assert type(small.get_layer("hidden")).__name__ == "LowRankDense"
    assert small.get_layer("hidden").rank == 2


@needs_surgery
def test_compress_learned_options_seed_and_reports(capsys, workdir, tmp_path):
    """Every distillation option reaches `factorize`; the same seed writes the
    same model; the report is written as JSON, Markdown and CSV."""
    x = np.load(workdir / "data.npz")["x"]
    np.save(tmp_path / "calib.npy", x[:32])
    np.savez(tmp_path / "distil.npz", x=x[32:96])
    common = [
        "compress", workdir / "pooled.keras", "--param-ratio", "0.5", "--method", "learned",
        "--calibration", tmp_path / "calib.npy", "--distillation-data", tmp_path / "distil.npz",
        "--distillation-epochs", "1", "--block-epochs", "1", "--learning-rate", "0.001",
        "--batch-size", "16", "--allocation", "uniform", "--no-sequential",
        "--distillation-loss", "mae", "--distillation-trainable", "all", "--seed", "3", "-q",
    ]
    weights = []
    for i, suffix in enumerate([".json", ".md", ".csv"]):
        out, report = tmp_path / f"small{i}.keras", tmp_path / f"report{suffix}"
        code, stdout, err = _run(capsys, [*common, "-o", out, "--report", report])
        assert code == 0, err
        assert f"Wrote {report}" in stdout
        assert "model output error on the calibration data" in stdout
        weights.append(keras.saving.load_model(out).get_weights())
        text = report.read_text()
        if suffix == ".json":
            data = json.loads(text)
            assert data["settings"]["seed"] == 3 and data["settings"]["allocation"] == "uniform"
            assert list(data["output_errors"]) == ["factorized", "distilled"]
            hidden = next(r for r in data["layers"] if r["path"] == "hidden")
            assert hidden["allocation"] == "uniform ratio" and hidden["rank"] is not None
            assert any("block-wise" in n for n in data["notes"])
        elif suffix == ".md":
            assert "| hidden |" in text and "uniform ratio" in text
        else:
            header = text.splitlines()[0].split(",")
            assert header[:4] == ["path", "layer_class", "shape", "rank"]
            assert "allocation" in header and len(text.splitlines()) == 4
    for a, b in zip(weights[0], weights[1]):
        np.testing.assert_array_equal(a, b)
    assert _no_leftovers(tmp_path, ["calib.npy", "distil.npz"] + [
        f"small{i}.keras" for i in range(3)] + ["report.json", "report.md", "report.csv"]) == []


@needs_surgery
@pytest.mark.parametrize(
    "extra, factorize_batch, distillation_batch",
    [
        ([], 32, "default"),
        (["--batch-size", "16"], 16, "default"),
        (["--distillation-batch-size", "4"], 32, 4),
        (["--batch-size", "64", "--distillation-batch-size", "2"], 64, 2),
    ],
)
def test_compress_distillation_batch_size_is_its_own(
    capsys, workdir, tmp_path, monkeypatch, extra, factorize_batch, distillation_batch
):
    """`--batch-size` runs the calibration data; the distillation trains in
    batches of `--distillation-batch-size`, by default `DistillationConfig`'s."""
    from keras_factorized import surgery
    from keras_factorized.cli import _common

    if distillation_batch == "default":
        distillation_batch = surgery.DistillationConfig().batch_size
        assert distillation_batch != 32  # else the default case could not fail
    seen = {}

    def recording_factorize(model, **kwargs):
        seen.update(kwargs)
        return model, None

    monkeypatch.setattr(_common, "factorize", recording_factorize)
    x = np.load(workdir / "data.npz")["x"][:16]
    np.save(tmp_path / "x.npy", x)
    code, _, err = _run(
        capsys,
        ["compress", workdir / "tiny.keras", "-o", tmp_path / "s.keras", "--rank", "2",
         "--method", "learned", "--calibration", tmp_path / "x.npy", "-q", *extra],
    )
    assert code == 0, err
    assert seen["batch_size"] == factorize_batch
    assert seen["distillation"].batch_size == distillation_batch


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--report", "r.html"], "must end with .json or .md or .csv or .txt"),
        (["--distillation-epochs", "-1"], "--distillation-epochs"),
        (["--token-noise", "1.5"], "--token-noise"),
        (["--distillation-trainable", "some"], "--distillation-trainable"),
        (["--seed", "x"], "--seed"),
        (["--seed", "-1"], "--seed"),
        (["--distillation-outputs", ","], "--distillation-outputs"),
        (["--distillation-batch-size", "0"], "--distillation-batch-size"),
    ],
)
def test_compress_bad_option_values(capsys, workdir, tmp_path, extra, fragment):
    code, _, err = _run(
        capsys,
        ["compress", workdir / "tiny.keras", "-o", tmp_path / "s.keras", "--rank", "2", *extra],
    )
    assert code == 2
    _assert_one_line_error(err, fragment)
    assert os.listdir(tmp_path) == []


def _variables(layer):
    return {v.path.split("/")[-1]: (v.dtype, tuple(v.shape)) for v in layer.weights}


@needs_surgery
def test_compress_quantize_int8_plain_dense(capsys, workdir, tmp_path):
    out, out_q = tmp_path / "small.keras", tmp_path / "small_int8.keras"
    common = ["compress", workdir / "pooled.keras", "--rank", "4", "--include", "^hidden$", "-q"]
    code, _, err = _run(capsys, [*common, "-o", out])
    assert code == 0, err
    code, stdout, err = _run(capsys, [*common, "-o", out_q, "--quantize", "int8"])
    assert code == 0, err
    assert "Quantized to int8:" in stdout and "Model bytes:" in stdout
    small = keras.saving.load_model(out)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. optimizer slots that do not fit
        small_q = keras.saving.load_model(out_q)
    dense = small_q.get_layer("out")  # a plain Dense, kept by --include
    assert type(dense).__name__ == "Dense" and dense.quantization_mode == "int8"
    assert _variables(dense)["kernel"] == ("int8", (16, 1))
    x = np.load(workdir / "data.npz")["x_val"]
    np.testing.assert_allclose(small_q.predict(x, verbose=0), small.predict(x, verbose=0),
                               atol=0.03)
    # inspect counts an int8 entry as 1 byte: kernel 16, kernel scale 4, bias 4.
    code, stdout, err = _run(capsys, ["inspect", out_q, "-q"])
    assert code == 0, err
    row = next(line.split() for line in stdout.splitlines() if line.startswith("out "))
    assert row[1:5] == ["Dense", "16x1", "16", "24"] and "quantized" in " ".join(row)


@needs_surgery
def test_compress_quantize_int8_factorized_layers(capsys, workdir, tmp_path):
    out, out_q = tmp_path / "small.keras", tmp_path / "small_int8.keras"
    common = ["compress", workdir / "pooled.keras", "--rank", "4", "-q"]
    assert _run(capsys, [*common, "-o", out])[0] == 0
    code, stdout, err = _run(capsys, [*common, "-o", out_q, "--quantize", "int8"])
    assert code == 0, err
    assert "Left in float" not in stdout
    small, small_q = keras.saving.load_model(out), keras.saving.load_model(out_q)
    for name, factors in [("embedding", ("embeddings_a", "embeddings_b")),
                          ("hidden", ("kernel_a", "kernel_b"))]:
        layer = small_q.get_layer(name)
        assert layer.quantization_mode == "int8", name
        assert all(_variables(layer)[f][0] == "int8" for f in factors), _variables(layer)
    x = np.load(workdir / "data.npz")["x_val"]
    float_out, int8_out = small.predict(x, verbose=0), small_q.predict(x, verbose=0)
    np.testing.assert_allclose(int8_out, float_out, atol=0.03)
    rows = {row["path"]: row for row in spectrum.inspect_model(small_q)}
    assert rows["embedding"]["rank"] == 4  # still analysed through its factors
    assert rows["embedding"]["bytes"] == 60 * 4 + 4 * 16 + 4 * 16  # int8 A, B; float32 scales


def test_quantize_choices_come_from_the_library(capsys):
    from keras_factorized.cli import _common

    _, out, _ = _run(capsys, ["compress", "--help"])
    assert "--quantize MODE" in out
    for mode in _common.quantization_modes():
        assert mode in out
    code, _, err = _run(capsys, ["compress", "m.keras", "-o", "o.keras", "--rank", "2",
                                 "--quantize", "int3"])
    assert code == 2
    _assert_one_line_error(err, "--quantize", "invalid choice")


def test_compress_argument_checks_before_loading(capsys, workdir, tmp_path):
    code, _, err = _run(
        capsys, ["compress", workdir / "tiny.keras", "-o", tmp_path / "small.h5", "--rank", "4"]
    )
    assert code == 2
    _assert_one_line_error(err, ".keras")
    code, _, err = _run(
        capsys,
        ["compress", workdir / "tiny.keras", "-o", tmp_path / "s.keras", "--rank", "4", "--method", "whitened"],
    )
    assert code == 2
    _assert_one_line_error(err, "--calibration")
    code, _, err = _run(
        capsys,
        ["compress", workdir / "tiny.keras", "-o", tmp_path / "s.keras", "--rank", "4",
         "--method", "whitened", "--calibration", tmp_path / "none.npy"],
    )
    assert code == 2
    _assert_one_line_error(err, "calibration file not found")
    from keras_factorized.surgery import ALLOCATIONS

    if "sensitivity" in ALLOCATIONS:
        code, _, err = _run(
            capsys,
            ["compress", workdir / "tiny.keras", "-o", tmp_path / "s.keras", "--param-ratio",
             "0.5", "--allocation", "sensitivity"],
        )
        assert code == 2
        _assert_one_line_error(err, "--allocation sensitivity needs --calibration")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- export


@TF_ONLY
def test_export_versions(capsys, workdir, tmp_path):
    export_dir = tmp_path / "serving"
    code, out, err = _run(capsys, ["export", workdir / "tiny.keras", export_dir, "--version", "3", "-q"])
    assert code == 0, err
    assert (export_dir / "3" / "saved_model.pb").exists()
    assert f"Wrote SavedModel {export_dir / '3'}" in out
    code, _, err = _run(capsys, ["export", workdir / "tiny.keras", export_dir, "--version", "3"])
    assert code == 2
    _assert_one_line_error(err, "already exists")
    assert sorted(os.listdir(export_dir)) == ["3"]


def test_export_failure_leaves_no_folder(capsys, workdir, tmp_path, monkeypatch):
    pytest.importorskip("tensorflow")
    from keras_factorized import export

    def broken_export(model, export_dir, version=None, **kwargs):
        os.makedirs(os.path.join(export_dir, ".tmp-1-x"))
        open(os.path.join(export_dir, ".tmp-1-x", "saved_model.pb"), "wb").close()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "export_for_serving", broken_export)
    code, _, err = _run(capsys, ["export", workdir / "tiny.keras", tmp_path / "a" / "serving", "-q"])
    assert code == 1
    _assert_one_line_error(err, "No space left")
    assert os.listdir(tmp_path) == []  # the folders it created are gone too


def test_export_failure_keeps_a_version_published_meanwhile(capsys, workdir, tmp_path, monkeypatch):
    pytest.importorskip("tensorflow")
    from keras_factorized import export

    def concurrent_then_broken(model, export_dir, version=None, **kwargs):
        # Another process publishes version 1 into the folder this call made.
        os.makedirs(os.path.join(export_dir, "1"))
        open(os.path.join(export_dir, "1", "saved_model.pb"), "wb").close()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "export_for_serving", concurrent_then_broken)
    code, _, err = _run(capsys, ["export", workdir / "tiny.keras", tmp_path / "a" / "serving", "-q"])
    assert code == 1
    assert (tmp_path / "a" / "serving" / "1" / "saved_model.pb").exists()


# ---------------------------------------------------------------- sweep


@needs_surgery
def test_sweep_npz_outputs(capsys, workdir, tmp_path):
    png, out_json, out_csv = tmp_path / "sweep.png", tmp_path / "sweep.json", tmp_path / "sweep.csv"
    code, out, err = _run(
        capsys,
        ["sweep", workdir / "pooled.keras", "--data", workdir / "data.npz", "--ranks", "4,2",
         "--fine-tune-epochs", "1", "--plot", png, "--json", out_json, "--csv", out_csv, "-q"],
    )
    assert code == 0, err
    rows = json.loads(out_json.read_text())
    assert [r["rank"] for r in rows] == ["full", 2, 4]
    assert rows[0]["params"] > rows[2]["params"] > rows[1]["params"]
    for row in rows:
        assert 0 <= row["accuracy"] <= 1
    assert "fine_tuned_accuracy" in rows[1]
    assert "fine_tuned_accuracy" in rows[0]  # the original gets the same training
    original = keras.saving.load_model(workdir / "pooled.keras")
    x_val = np.load(workdir / "data.npz")["x_val"]
    y_val = np.load(workdir / "data.npz")["y_val"]
    _, accuracy = original.evaluate(x_val, y_val, verbose=0)
    assert rows[0]["accuracy"] == pytest.approx(accuracy, abs=1e-3)
    assert out_csv.read_text().splitlines()[0].startswith("rank,params,param_fraction,bytes,loss,accuracy")
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert "full" in out and "fine_tuned_accuracy" in out


@needs_surgery
def test_sweep_quantize_columns(capsys, workdir, tmp_path):
    out_json, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    code, _, err = _run(
        capsys,
        ["sweep", workdir / "pooled.keras", "--data", workdir / "data.npz", "--ranks", "4,2",
         "--include", "^hidden$", "--quantize", "int8", "--json", out_json, "--plot", png,
         "--fine-tune-epochs", "1", "-q"],
    )
    assert code == 0, err
    rows = json.loads(out_json.read_text())
    assert [r["rank"] for r in rows] == ["full", 2, 4]
    for row in rows:
        assert row["int8_bytes"] < row["bytes"]
        assert abs(row["int8_accuracy"] - row["fine_tuned_accuracy"]) <= 0.1
    assert png.read_bytes()[:8] == PNG_SIGNATURE


def test_sweep_bad_data(capsys, workdir, tmp_path):
    np.savez(tmp_path / "bad.npz", inputs=np.zeros((4, 10)))
    code, _, err = _run(capsys, ["sweep", workdir / "tiny.keras", "--data", tmp_path / "bad.npz"])
    assert code == 2
    _assert_one_line_error(err, "`x` and `y`")
    code, _, err = _run(capsys, ["sweep", workdir / "tiny.keras", "--data", IMDB_FIXTURE])
    assert code == 2
    _assert_one_line_error(err, "does not take strings")
    code, _, err = _run(capsys, ["sweep", workdir / "tiny.keras", "--data", tmp_path / "none.npz"])
    assert code == 2
    _assert_one_line_error(err, "not found")


# ---------------------------------------------------------------- imdb


def _fake_example(folder, body):
    script = folder / "examples" / "imdb_lstm" / "imdb_lstm.py"
    script.parent.mkdir(parents=True)
    script.write_text(body)
    return str(script)


def test_imdb_runs_the_example_script_with_its_arguments(capsys, monkeypatch, tmp_path):
    from keras_factorized.cli import imdb_command

    script = _fake_example(
        tmp_path,
        "import argparse, json, sys\n"
        "def main(argv):\n"
        "    print(json.dumps({'argv': argv, 'argv0': sys.argv[0]}))\n"
        "    return 3\n",
    )
    monkeypatch.setattr(imdb_command, "example_script", lambda: script)
    path_before, argv0_before = list(sys.path), sys.argv[0]
    code, out, err = _run(capsys, ["imdb", "--data", IMDB_FIXTURE, "--ranks", "8,2", "--help"])
    assert code == 3, err
    seen = json.loads(out)
    assert seen["argv"] == ["--data", IMDB_FIXTURE, "--ranks", "8,2", "--help"]
    assert seen["argv0"] == "keras-factorized imdb"  # argparse's default prog
    assert sys.path == path_before and sys.argv[0] == argv0_before


def test_imdb_argparse_errors_of_the_script_are_one_line(capsys, monkeypatch, tmp_path):
    from keras_factorized.cli import imdb_command

    script = _fake_example(
        tmp_path,
        "import argparse\n"
        "def main(argv):\n"
        "    parser = argparse.ArgumentParser()\n"
        "    parser.add_argument('--epochs', type=int, default=1)\n"
        "    args = parser.parse_args(argv)\n"
        "    if args.epochs < 1:\n"
        "        raise ValueError(f'Received an invalid value for `epochs`: {args.epochs}')\n"
        "    return 0\n",
    )
    monkeypatch.setattr(imdb_command, "example_script", lambda: script)
    argparse_error = argparse.ArgumentParser.error
    code, _, err = _run(capsys, ["imdb", "--epochs", "x"])
    assert code == 2
    _assert_one_line_error(err, "--epochs", "keras-factorized imdb --help")
    code, _, err = _run(capsys, ["imdb", "--epochs", "0"])
    assert code == 2
    _assert_one_line_error(err, "`epochs`")
    assert argparse.ArgumentParser.error is argparse_error  # restored


def test_imdb_without_a_source_checkout(capsys, monkeypatch):
    from keras_factorized.cli import imdb_command

    monkeypatch.setattr(imdb_command, "example_script", lambda: None)
    code, _, err = _run(capsys, ["imdb", "--epochs", "1"])
    assert code == 2
    _assert_one_line_error(err, "ships with the source repository", "examples/imdb_lstm")


def test_imdb_example_of_this_checkout_is_found():
    from keras_factorized.cli import imdb_command

    script = imdb_command.example_script()
    if script is None:
        pytest.skip("not a source checkout")
    assert script.endswith(os.path.join("examples", "imdb_lstm", "imdb_lstm.py"))


def test_imdb_bad_value_is_one_line(capsys):
    code, _, err = _run(capsys, ["imdb", "--data", IMDB_FIXTURE, "--epochs", "0"])
    assert code == 2
    _assert_one_line_error(err, "`epochs`")
    code, _, err = _run(capsys, ["imdb", "--ranks", "a"])
    assert code == 2
    _assert_one_line_error(err, "--ranks")


@needs_surgery
@TF_ONLY
def test_sweep_imdb_reviews_with_string_model(capsys, tmp_path):
    from keras_factorized.datasets import imdb

    train, _, _ = imdb.load_data(IMDB_FIXTURE, max_samples=60)
    vectorizer = keras.layers.TextVectorization(max_tokens=200, output_sequence_length=16)
    vectorizer.adapt(train.texts.astype(str))
    inputs = keras.Input((), dtype="string")
    h = keras.layers.Embedding(200, 8, name="embedding")(vectorizer(inputs))
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="out")(h))
    model.compile("adam", "binary_crossentropy", metrics=["accuracy"])
    model.save(tmp_path / "text.keras")
    out_json = tmp_path / "sweep.json"
    code, _, err = _run(
        capsys,
        ["sweep", tmp_path / "text.keras", "--data", IMDB_FIXTURE, "--ranks", "2",
         "--max-samples", "60", "--include", "embedding", "--json", out_json, "-q"],
    )
    assert code == 0, err
    rows = json.loads(out_json.read_text())
    assert [r["rank"] for r in rows] == ["full", 2]
    assert rows[1]["params"] < rows[0]["params"]


@pytest.mark.parametrize(
    "module", [spectrum, cli, reporting], ids=["spectrum", "cli", "reporting"]
)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_traceback_flag_shows_the_traceback(capsys, tmp_path):
    with pytest.raises(cli.UsageError, match="model file not found"):
        cli.main(["--traceback", "inspect", str(tmp_path / "none.keras")])
    code, _, err = _run(capsys, ["inspect", "--traceback", "m.keras"])
    assert code == 2  # the flag goes before the command; misplaced, it is a usage error
    _assert_one_line_error(err, "unrecognized arguments: --traceback")
