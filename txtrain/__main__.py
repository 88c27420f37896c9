"""`python -m txtrain` and `torchrun -m txtrain` run the same app as the `txtrain` command."""

from txtrain.cli import main

if __name__ == "__main__":
    main()
