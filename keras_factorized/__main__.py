"""`python -m keras_factorized`: the `keras-factorized` command line."""

import sys

from keras_factorized.cli import main

if __name__ == "__main__":
    sys.exit(main())
