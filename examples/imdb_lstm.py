"""IMDB sentiment classifier: full Embedding vs FactorizedEmbedding vs SVD-compressed.

Same code as `keras-factorized imdb`; see `keras_factorized/imdb_classifier.py`
and the README section "IMDB example" for the flags and outputs.

    python examples/imdb_lstm.py --data ../shared/data/aclImdb_v1.tar.gz
    python examples/imdb_lstm.py --data ../shared/data/aclImdb_v1.tar.gz --max-samples 2000 --epochs 1
"""

import sys

from keras_factorized.imdb_classifier import main

if __name__ == "__main__":
    sys.exit(main())
