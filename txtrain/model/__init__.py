from txtrain.config import ModelConfig
from txtrain.model.base import LanguageModel
from txtrain.model.encoder import Encoder
from txtrain.model.seq2seq import EncoderDecoder
from txtrain.model.transformer import Transformer

ARCHITECTURES: dict[str, type[LanguageModel]] = {"gpt": Transformer, "encoder": Encoder,
                                                 "encoder_decoder": EncoderDecoder}


def model_class(cfg: ModelConfig) -> type[LanguageModel]:
    """The class ``cfg.arch`` names, for what it declares before the model is built."""
    return ARCHITECTURES[str(cfg.arch)]


def build_model(cfg: ModelConfig, vocab_size: int) -> LanguageModel:
    """The architecture ``cfg.arch`` names: the GPT, the encoder (BERT), or the 2017
    encoder-decoder."""
    return model_class(cfg)(cfg, vocab_size)


__all__ = ["ARCHITECTURES", "Encoder", "EncoderDecoder", "LanguageModel", "Transformer", "build_model", "model_class"]
