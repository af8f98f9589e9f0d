"""`factorize` on models that carry their preprocessing: KerasHub tasks, `TextVectorization`.

A KerasHub task that has been used (one `predict` on raw strings, as any
trained model has) builds sub-layers its fresh copy lacks (the preprocessor's
packer); the copy must still get every asset (the tokenizer's vocabulary),
then predict, fit, save and load like the original task.
"""

import keras
import numpy as np
import pytest
from tiny_models import tiny_bert

from keras_factorized import LowRankEinsumDense
from keras_factorized import WhitenedConfig
from keras_factorized import factorize

keras_hub = pytest.importorskip("keras_hub")

WORDS = "the a movie film was is good bad great awful plot acting".split()
TEXTS = np.array(["the movie was good", "awful film", "great acting", "the plot is bad"],
                 dtype=object)
LABELS = np.array([1, 0, 1, 0])
ALL_SIX = r"(self_attention_layer/(query|key|value|attention_output)|feedforward_(intermediate|output)_dense)$"


def tiny_task(seed=0):
    keras.utils.set_random_seed(seed)
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=8)
    backbone = tiny_bert(len(vocabulary), max_sequence_length=8)
    return keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=preprocessor)


def _tokens(preprocessor, texts):
    return {k: keras.ops.convert_to_numpy(v) for k, v in preprocessor(texts).items()}


def test_used_task_keeps_its_vocabulary_and_predicts_like_a_fresh_one():
    fresh, used = tiny_task(), tiny_task()
    before = used.predict(TEXTS, verbose=0)  # builds the preprocessor's packer
    include = r"self_attention_layer/(query|key|value)$"
    small = factorize(used, rank=4, include=include)
    assert sum(isinstance(x, LowRankEinsumDense) for x in small.backbone._flatten_layers()) == 6
    vocabulary = used.preprocessor.tokenizer.get_vocabulary()
    assert small.preprocessor.tokenizer.get_vocabulary() == vocabulary
    np.testing.assert_array_equal(_tokens(small.preprocessor, TEXTS)["token_ids"],
                                  _tokens(used.preprocessor, TEXTS)["token_ids"])
    # Raw strings give what the factorized never-used task gives (same weights).
    expected = factorize(fresh, rank=4, include=include).predict(TEXTS, verbose=0)
    np.testing.assert_allclose(small.predict(TEXTS, verbose=0), expected, atol=1e-5)
    # The original is untouched.
    np.testing.assert_allclose(used.predict(TEXTS, verbose=0), before, atol=1e-6)


def test_used_task_factorized_whitened_fits_saves_and_loads(tmp_path):
    task = tiny_task()
    task.predict(TEXTS, verbose=0)
    calibration = _tokens(task.preprocessor, TEXTS)
    small = factorize(task, param_ratio=0.5, method="whitened", calibration_data=calibration,
                      include=ALL_SIX, whitening=WhitenedConfig(sequential=False))
    assert isinstance(small, keras_hub.models.BertTextClassifier)
    small.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = small.fit(TEXTS, LABELS, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    expected = small.predict(TEXTS, verbose=0)
    path = str(tmp_path / "task.keras")
    small.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.preprocessor.tokenizer.get_vocabulary() == task.preprocessor.tokenizer.get_vocabulary()
    assert any(isinstance(x, LowRankEinsumDense) for x in loaded.backbone._flatten_layers())
    np.testing.assert_allclose(loaded.predict(TEXTS, verbose=0), expected, atol=1e-5)


def test_used_task_factorizes_with_the_default_whitened_options():
    """Every default step (allocation, refits) reaches blocks inside the task's backbone."""
    task = tiny_task()
    task.predict(TEXTS, verbose=0)
    small = factorize(task, param_ratio=0.5, method="whitened",
                      calibration_data=_tokens(task.preprocessor, TEXTS), include=ALL_SIX)
    assert len(small.factorization_report.layers) == 12
    assert np.all(np.isfinite(small.predict(TEXTS, verbose=0)))


def test_used_text_vectorization_model_keeps_its_vocabulary():
    vectorizer = keras.layers.TextVectorization(max_tokens=20, output_sequence_length=4)
    vectorizer.adapt(TEXTS)
    ids = keras.ops.convert_to_numpy(vectorizer(TEXTS))
    if keras.backend.backend() != "tensorflow":
        # JAX has no string inputs: the vectorizer runs outside the model (in
        # tf.data); copying it is copying its assets.
        from keras_factorized.surgery.copying import copy_assets

        copy = keras.layers.TextVectorization.from_config(vectorizer.get_config())
        copy_assets(vectorizer, copy)
        assert copy.get_vocabulary() == vectorizer.get_vocabulary()
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(copy(TEXTS)), ids)
        return
    inputs = keras.Input((), dtype="string")
    hidden = keras.layers.Embedding(20, 16, name="embedding")(vectorizer(inputs))
    hidden = keras.layers.Dense(8, name="hidden")(keras.layers.GlobalAveragePooling1D()(hidden))
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(hidden))
    model.predict(TEXTS, verbose=0)
    small = factorize(model, rank=2, include="embedding")
    # The copy looks words up in the same vocabulary ("Table not initialized" before).
    copied = [x for x in small.layers if isinstance(x, keras.layers.TextVectorization)]
    assert copied[0].get_vocabulary() == vectorizer.get_vocabulary()
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(copied[0](TEXTS)), ids)
    assert np.all(np.isfinite(small.predict(TEXTS, verbose=0)))
