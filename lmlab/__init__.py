"""lmlab: build, train, run and apply language models on your own machine."""

import lmlab.train as _train_module  # first: importing it later would rebind `lmlab.train` to the module
from lmlab.api import Model, load
from lmlab.errors import LmlabError

__version__ = "0.1.0"


def train(**options):
    """Train a model; the same options as ``lmlab train`` (see :class:`lmlab.train.TrainConfig`)."""
    return _train_module.train(**options)


__all__ = ["LmlabError", "Model", "load", "train", "__version__"]
