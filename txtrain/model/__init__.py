from txtrain.config import ModelConfig
from txtrain.model.seq2seq import EncoderDecoder
from txtrain.model.transformer import Transformer


def build_model(cfg: ModelConfig, vocab_size: int) -> Transformer | EncoderDecoder:
    """The architecture ``cfg.arch`` names: the GPT, or the 2017 encoder-decoder."""
    if cfg.arch == "encoder_decoder":
        return EncoderDecoder(cfg, vocab_size)
    return Transformer(cfg, vocab_size)


__all__ = ["EncoderDecoder", "Transformer", "build_model"]
