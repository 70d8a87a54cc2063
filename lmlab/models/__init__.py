"""Language models. Every one follows the same protocol (see :mod:`lmlab.models.base`)."""

from __future__ import annotations

from lmlab.config import ModelConfig, RNNConfig, TransformerConfig
from lmlab.errors import LmlabError
from lmlab.models.base import LanguageModel


def build_model(config: ModelConfig) -> LanguageModel:
    """The model a config describes, freshly initialised."""
    if isinstance(config, TransformerConfig):
        from lmlab.models.transformer import Transformer

        return Transformer(config)
    if isinstance(config, RNNConfig):
        try:
            from lmlab.models.rnn import RNNLanguageModel
        except ImportError:
            raise LmlabError("this lmlab has no recurrent models yet") from None
        return RNNLanguageModel(config)
    raise LmlabError(f"no model for config of type {type(config).__name__}")


__all__ = ["LanguageModel", "build_model"]
