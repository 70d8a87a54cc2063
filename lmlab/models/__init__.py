"""Language models. Every one follows the same protocol (see :mod:`lmlab.models.base`)."""

from __future__ import annotations

from lmlab.errors import LmlabError
from lmlab.models.base import LanguageModel
from lmlab.models.config import ModelConfig, RNNConfig, RNNSeq2SeqConfig, Seq2SeqConfig, TransformerConfig
from lmlab.models.task_config import EncoderConfig, TaskConfig  # registers model_type encoder and task


def build_model(config: ModelConfig) -> LanguageModel:
    """The model a config describes, freshly initialised (or on the meta device, shapes
    only, when the caller builds under ``torch.device("meta")``). A config whose weights
    exceed the machine's memory is refused before anything is allocated."""
    from lmlab.models.limits import check_fits_in_memory

    if isinstance(config, (TransformerConfig, RNNConfig, Seq2SeqConfig, RNNSeq2SeqConfig, TaskConfig)):
        check_fits_in_memory(config)
    if isinstance(config, TransformerConfig):
        from lmlab.models.transformer import Transformer

        return Transformer(config)
    if isinstance(config, RNNConfig):
        from lmlab.models.rnn import RNNLanguageModel

        return RNNLanguageModel(config)
    if isinstance(config, Seq2SeqConfig):
        from lmlab.models.seq2seq import Seq2SeqTransformer

        return Seq2SeqTransformer(config)
    if isinstance(config, RNNSeq2SeqConfig):
        from lmlab.models.rnn_seq2seq import RNNSeq2Seq

        return RNNSeq2Seq(config)
    if isinstance(config, TaskConfig):
        from lmlab.models.heads import TaskModel

        return TaskModel(config)
    if isinstance(config, EncoderConfig):
        raise LmlabError("an encoder alone has no output; give it a task head (TaskConfig(body=...))")
    raise LmlabError(f"no model for config of type {type(config).__name__}")


__all__ = ["LanguageModel", "build_model"]
