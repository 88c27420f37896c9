"""The Hydra config tree, shipped inside the package."""
