"""Reliability: atomic and concurrent writes, permissions, faults (SIGKILL, full disk).

Each guarantee of `docs/reliability.md` is checked here by trying to break it:
several processes racing for the same export path, processes killed at a
chosen point (after writing, before publishing) or at a random one, and a
disk that fills up during a save.
"""

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time

import keras
import numpy as np
import pytest

from keras_factorized import atomic_io

HERE = os.path.dirname(os.path.abspath(__file__))
IMDB_FIXTURE = os.path.join(HERE, "data", "imdb_fixture", "aclImdb_mini.tar.gz")
CHILD_TIMEOUT = 240
tensorflow_only = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="SavedModel export needs the TensorFlow backend",
)


@pytest.fixture
def umask():
    """Sets a umask for one test and restores the previous one."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda value: os.umask(value)
    os.umask(previous)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def hidden(folder):
    return sorted(name for name in os.listdir(folder) if name.startswith("."))


def child_env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}


def start_child(tmp_path, name, source, *args):
    script = tmp_path / f"{name}.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path, process, timeout=CHILD_TIMEOUT):
    """Waits until `path` exists; fails with the child's output if it died."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"child exited with {process.returncode}: {err[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {path}")
        time.sleep(0.05)


def sigkill(process):
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    process.stdout.close()
    process.stderr.close()


# ---------------------------------------------------------------------------
# atomic_io


def test_new_file_gets_the_umask_permissions(tmp_path, umask):
    # Issue 14, problem 3: was 0o600 (mkstemp) whatever the umask.
    for value, expected in ((0o022, 0o644), (0o027, 0o640), (0o002, 0o664)):
        umask(value)
        path = tmp_path / f"results-{value:o}.json"
        atomic_io.write_text(path, "{}")
        assert mode(path) == expected
        with atomic_io.atomic_output(tmp_path / f"plot-{value:o}.png") as tmp:
            with open(tmp, "wb") as f:  # Writers that open the path by name.
                f.write(b"png")
        assert mode(tmp_path / f"plot-{value:o}.png") == expected


def test_replaced_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "results.csv"
    path.write_text("old")
    os.chmod(path, 0o640)
    atomic_io.write_text(path, "new")
    assert path.read_text() == "new" and mode(path) == 0o640


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_io.atomic_output(path) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["table.csv"]


def test_overwrite_false_never_replaces_even_a_file_that_appears_meanwhile(tmp_path):
    path = tmp_path / "model.tflite"
    with pytest.raises(FileExistsError):
        with atomic_io.atomic_output(path, overwrite=False) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"mine")
            path.write_bytes(b"theirs")  # Another writer wins the race.
    assert path.read_bytes() == b"theirs"
    assert os.listdir(tmp_path) == ["model.tflite"]
    with pytest.raises(FileExistsError):
        atomic_io.write_bytes(path, b"again", overwrite=False)
    assert path.read_bytes() == b"theirs"


def test_concurrent_writers_leave_one_complete_file(tmp_path):
    path = tmp_path / "results.json"
    contents = {i: json.dumps({"writer": i, "data": [i] * 5000}) for i in range(8)}
    errors = []

    def write(i):
        try:
            for _ in range(10):
                atomic_io.write_text(path, contents[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert path.read_text() in contents.values()
    assert os.listdir(tmp_path) == ["results.json"]


def test_publish_directory_swaps_or_refuses(tmp_path):
    target = tmp_path / "7"
    first = atomic_io.temporary_directory(tmp_path, "export")
    (tmp_path / first / "a").write_text("first")
    atomic_io.publish_directory(first, target)
    second = atomic_io.temporary_directory(tmp_path, "export")
    (tmp_path / second / "b").write_text("second")
    with pytest.raises(FileExistsError):
        atomic_io.publish_directory(second, target)
    assert os.listdir(target) == ["a"]
    atomic_io.publish_directory(second, target, overwrite=True)
    assert os.listdir(target) == ["b"]
    assert sorted(os.listdir(tmp_path)) == ["7"]
    # Even an empty folder of that name is not replaced without overwrite.
    (tmp_path / "8").mkdir()
    third = atomic_io.temporary_directory(tmp_path, "export")
    (tmp_path / third / "c").write_text("third")
    with pytest.raises(FileExistsError):
        atomic_io.rename_no_replace(third, tmp_path / "8")
    assert os.listdir(tmp_path / "8") == []


def test_leftovers_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = atomic_io.temporary_name(str(tmp_path), "model", ".keras").replace(
        f"-{os.getpid()}-", f"-{child.pid}-"
    )
    open(dead, "w").close()
    mine = atomic_io.temporary_name(str(tmp_path), "model", ".keras")
    open(mine, "w").close()
    with atomic_io.atomic_output(tmp_path / "model.keras") as tmp:
        open(tmp, "w").close()
    assert not os.path.exists(dead) and os.path.exists(mine)


class _FullDisk:
    """A file object whose writes fail with ENOSPC after `limit` bytes."""

    def __init__(self, f, limit):
        self._f, self._left = f, limit

    def write(self, data):
        if len(data) > self._left:
            self._f.write(data[: self._left])
            self._left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def full_disk(monkeypatch):
    """Makes every write to a temporary `.part` file fail after 2 kB."""
    import builtins

    real_open = builtins.open
    failures = []

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        is_path = isinstance(file, (str, os.PathLike))
        if is_path and ".part" in os.fspath(file) and any(c in mode for c in "wax"):
            failures.append(file)
            return _FullDisk(f, 2048)
        return f

    monkeypatch.setattr(builtins, "open", open_on_full_disk)
    return failures


def tiny_model(seed=0, bias=0.0):
    keras.utils.set_random_seed(seed)
    from keras_factorized import LowRankDense

    model = keras.Sequential(
        [keras.Input((6,)), LowRankDense(4, rank=2, name="low_rank"), keras.layers.Dense(1)]
    )
    weights = model.get_weights()
    weights[-1] = np.full_like(weights[-1], bias)
    model.set_weights(weights)
    return model


def test_full_disk_during_save_keeps_the_old_model(tmp_path, full_disk):
    path = tmp_path / "model.keras"
    tiny_model(bias=1.0).save(path)
    before = path.read_bytes()
    with pytest.raises(OSError) as caught:
        with atomic_io.atomic_output(path) as tmp:
            tiny_model(bias=2.0).save(tmp)
    assert caught.value.errno == errno.ENOSPC and full_disk
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.keras"]


def test_full_disk_in_the_cli_exits_1_with_one_line(tmp_path, full_disk, capsys):
    from keras_factorized.cli import main

    source, output = tmp_path / "model.keras", tmp_path / "small.keras"
    keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), keras.layers.Dense(1)]).save(
        source
    )  # A plain write (no `.part` name): the disk is "full" only for temporaries.
    output.write_bytes(b"previous result")
    code = main(["compress", str(source), "-o", str(output), "--rank", "2", "--overwrite", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and "No space left on device" in err
    assert output.read_bytes() == b"previous result"
    assert sorted(os.listdir(tmp_path)) == ["model.keras", "small.keras"]


# ---------------------------------------------------------------------------
# export_for_serving: concurrent writers, permissions, SIGKILL

# A child process that exports its own tiny model (output bias = its index)
# into a shared base path. Every child waits at a barrier once its SavedModel
# is written, so all of them publish at the same moment (the worst case).
EXPORT_CHILD = """
import json, os, sys, time
import keras, numpy as np
sys.path.insert(0, {tests!r})
from test_reliability import tiny_model
from keras_factorized import export

base, barrier, index, count, version = sys.argv[1:6]
index, count = int(index), int(count)
version = None if version == "auto" else int(version)
archive_class = type(keras.export.ExportArchive())
write_out = archive_class.write_out

def write_out_then_wait(self, *args, **kwargs):
    write_out(self, *args, **kwargs)
    open(os.path.join(barrier, str(index)), "w").close()
    deadline = time.monotonic() + 120
    while len(os.listdir(barrier)) < count and time.monotonic() < deadline:
        time.sleep(0.01)

archive_class.write_out = write_out_then_wait
model = tiny_model(seed=index, bias=float(index))
x = np.linspace(-1, 1, 12, dtype="float32").reshape(2, 6)
try:
    result = export.export_for_serving(model, base, version=version)
except FileExistsError as e:
    result = "FileExistsError: " + str(e)
print(json.dumps({{"index": index, "result": result,
                   "expected": model.predict(x, verbose=0).tolist()}}))
"""


def serve(version_dir, x):
    import tensorflow as tf

    signature = tf.saved_model.load(version_dir).signatures["serving_default"]
    return signature(inputs=tf.constant(x))["predictions"].numpy()


@tensorflow_only
def test_concurrent_exports_get_distinct_versions_and_serve_their_own_model(tmp_path):
    # Issue 14, problem 1: 6 processes with version=None all got version 1
    # (one folder left, 5 models silently lost), and 2 processes exporting
    # version=100 without overwrite both "succeeded".
    base, barrier = tmp_path / "serving", tmp_path / "barrier"
    barrier.mkdir()
    versions = ["auto"] * 6 + ["100", "100"]
    script = EXPORT_CHILD.format(tests=HERE)
    children = [
        start_child(tmp_path, f"child{i}", script, base, barrier, i, len(versions), v)
        for i, v in enumerate(versions)
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=CHILD_TIMEOUT)
        assert child.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    auto = [r["result"] for r in results[:6]]
    explicit = [r["result"] for r in results[6:]]
    assert len(set(auto)) == 6, auto
    assert sorted(explicit)[0] == str(base / "100"), explicit
    assert sorted(explicit)[1].startswith("FileExistsError: Version 100 already exists")
    published = [r for r in results if not r["result"].startswith("FileExistsError")]
    assert sorted(os.listdir(base)) == sorted(os.path.basename(r["result"]) for r in published)
    x = np.linspace(-1, 1, 12, dtype="float32").reshape(2, 6)
    for r in published:  # Each version serves the model of the call that got it.
        np.testing.assert_allclose(serve(r["result"], x), r["expected"], atol=1e-5)


@tensorflow_only
def test_sequential_exports_into_one_path_each_serve_their_model(tmp_path):
    # 100 calls here (about 10 s); benchmarks/export_load.py runs 1,000.
    from keras_factorized import export

    model = tiny_model()
    x = np.linspace(-1, 1, 12, dtype="float32").reshape(2, 6)
    reference = model.predict(x, verbose=0)
    weights = model.get_weights()
    paths = []
    for i in range(100):
        weights[-1] = np.full_like(weights[-1], float(i))
        model.set_weights(weights)
        paths.append(export.export_for_serving(model, tmp_path))
    assert paths == [str(tmp_path / str(i)) for i in range(1, 101)]
    assert sorted(os.listdir(tmp_path), key=int) == [str(i) for i in range(1, 101)]
    for i in (0, 1, 57, 99):  # Bias i shifts the reference output by i.
        np.testing.assert_allclose(serve(paths[i], x), reference + i, atol=1e-4)


@tensorflow_only
@pytest.mark.parametrize("umask_value, dirs, files", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_export_has_the_permissions_of_a_plain_write(tmp_path, umask, umask_value, dirs, files):
    # Issue 14, problem 3: version folders were 0o700 (tempfile.mkdtemp).
    from keras_factorized import export

    umask(umask_value)
    version_dir = export.export_for_serving(tiny_model(), tmp_path / "serving")
    for folder, _, names in os.walk(version_dir):
        assert mode(folder) == dirs, folder
        for name in names:
            assert mode(os.path.join(folder, name)) == files, name
    replaced = export.export_for_serving(tiny_model(), tmp_path / "serving", version=1,
                                         overwrite=True)
    assert mode(replaced) == dirs


@tensorflow_only
def test_overwrite_replaces_the_version_in_one_step(tmp_path):
    from keras_factorized import export

    x = np.linspace(-1, 1, 12, dtype="float32").reshape(2, 6)
    first = export.export_for_serving(tiny_model(bias=1.0), tmp_path, version=4)
    old = serve(first, x)
    second = export.export_for_serving(tiny_model(bias=5.0), tmp_path, version=4,
                                       overwrite=True)
    assert first == second and sorted(os.listdir(tmp_path)) == ["4"]
    np.testing.assert_allclose(serve(second, x), old + 4.0, atol=1e-4)


KILLED_EXPORT_CHILD = """
import os, sys, time
import keras
sys.path.insert(0, {tests!r})
from test_reliability import tiny_model
from keras_factorized import export

base, written, stall = sys.argv[1:4]
archive_class = type(keras.export.ExportArchive())
write_out = archive_class.write_out

def write_out_then_stall(self, *args, **kwargs):
    write_out(self, *args, **kwargs)
    open(written, "w").close()
    if stall == "yes":
        time.sleep(600)  # Killed here: written, not yet published.

archive_class.write_out = write_out_then_stall
model = tiny_model()
weights = model.get_weights()
for i in range(1000):
    weights[-1][:] = float(i)
    model.set_weights(weights)
    export.export_for_serving(model, base)
"""


def check_served_versions(base):
    """Every integer folder is a complete SavedModel serving its own bias."""
    x = np.zeros((1, 6), dtype="float32")
    versions = sorted(int(n) for n in os.listdir(base) if n.isdigit())
    for version in versions:
        assert serve(os.path.join(base, str(version)), x)[0, 0] == pytest.approx(
            version - 1, abs=1e-4
        )
    return versions


@tensorflow_only
@pytest.mark.parametrize("point", ["before_publish", "random"])
def test_export_killed_leaves_no_partial_version_and_next_run_works(tmp_path, point):
    from keras_factorized import export

    base, written = tmp_path / "serving", tmp_path / "written"
    script = KILLED_EXPORT_CHILD.format(tests=HERE)
    child = start_child(tmp_path, "child", script, base, written,
                        "yes" if point == "before_publish" else "no")
    wait_for(written, child)
    if point == "random":
        # Inside the loop of exports, at a seeded random moment.
        while len(os.listdir(base)) < 3:
            wait_for(base, child)
            time.sleep(0.01)
        time.sleep(np.random.default_rng(14).uniform(0, 0.3))
    sigkill(child)
    versions = check_served_versions(base)
    assert versions == list(range(1, len(versions) + 1))
    if point == "before_publish":
        assert versions == [] and len(hidden(base)) == 1  # The killed one's work.
    # The next export works, takes the next number and clears the leftovers.
    path = export.export_for_serving(tiny_model(bias=float(len(versions))), base)
    assert path == str(base / str(len(versions) + 1))
    assert check_served_versions(base) == list(range(1, len(versions) + 2))
    assert hidden(base) == []


# ---------------------------------------------------------------------------
# SIGKILL during a `.keras` save through the command line, and during dataset
# extraction

KILLED_COMPRESS_CHILD = """
import sys, time
import keras
source, output, stalled = sys.argv[1:4]
real_save = keras.Model.save

def save_half_then_stall(self, filepath, *args, **kwargs):
    real_save(self, filepath, *args, **kwargs)
    data = open(filepath, "rb").read()
    open(filepath, "wb").write(data[: len(data) // 2])  # A write in progress.
    open(stalled, "w").close()
    time.sleep(600)

keras.Model.save = save_half_then_stall
from keras_factorized.cli import main
sys.exit(main(["compress", source, "-o", output, "--rank", "2", "--overwrite", "-q"]))
"""


def plain_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), keras.layers.Dense(1)])


def test_cli_killed_while_saving_keeps_the_previous_output(tmp_path):
    from keras_factorized.cli import main

    source, output, stalled = tmp_path / "model.keras", tmp_path / "small.keras", tmp_path / "s"
    plain_model().save(source)
    previous = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
    previous.save(output)
    before = output.read_bytes()
    child = start_child(tmp_path, "child", KILLED_COMPRESS_CHILD, source, output, stalled)
    wait_for(stalled, child)
    sigkill(child)
    assert output.read_bytes() == before  # The complete old file, not half a new one.
    assert len(keras.saving.load_model(output).layers) == 1
    # The next run works and removes the killed writer's temporary file.
    assert main(["compress", str(source), "-o", str(output), "--rank", "2", "--overwrite",
                 "-q"]) == 0
    assert "LowRankDense" in [type(layer).__name__ for layer in keras.saving.load_model(output).layers]
    assert hidden(tmp_path) == []


KILLED_EXTRACT_CHILD = """
import sys, tarfile, time
from keras_factorized.datasets import imdb
archive, target, stalled = sys.argv[1:4]
real_extractall = tarfile.TarFile.extractall

def extract_then_stall(self, path=".", *args, **kwargs):
    real_extractall(self, path, *args, **kwargs)
    open(stalled, "w").close()
    time.sleep(600)

tarfile.TarFile.extractall = extract_then_stall
imdb.extract(archive, target)
"""


def test_extraction_killed_leaves_no_dataset_a_reader_could_take(tmp_path):
    from keras_factorized.datasets import imdb

    target, stalled = tmp_path / "data", tmp_path / "stalled"
    child = start_child(tmp_path, "child", KILLED_EXTRACT_CHILD, IMDB_FIXTURE, target, stalled)
    wait_for(stalled, child)
    sigkill(child)
    assert not (target / "aclImdb").exists()
    with pytest.raises(ValueError):
        imdb.read_reviews(str(target))  # Nothing there to mistake for the data.
    folder = imdb.extract(IMDB_FIXTURE, str(target))  # The next run works.
    reviews = imdb.read_reviews(folder)
    assert [len(reviews[s].texts) for s in ("train", "test")] == [200, 100]
