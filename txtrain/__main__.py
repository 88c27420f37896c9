"""`python -m txtrain`, `torchrun -m txtrain` and, from the project root, `torchrun txtrain`
run the same app as the `txtrain` command."""

import os
import sys

if not __package__:
    # Run as a folder (`torchrun txtrain ...`): Python put this folder first on sys.path, where
    # our module names (config, model, ...) would shadow others; import the package instead.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from txtrain.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
