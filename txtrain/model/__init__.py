from txtrain.model.transformer import Transformer

__all__ = ["Transformer"]
