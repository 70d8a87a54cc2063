"""lmlab: build, train, run and apply language models on your own machine."""

from lmlab.api import Model, load
from lmlab.errors import LmlabError

__version__ = "0.1.0"


def train(**options):
    """Train a model; the same options as ``lmlab train`` (see :class:`lmlab.train.TrainConfig`)."""
    from lmlab.train import train as _train

    return _train(**options)


__all__ = ["LmlabError", "Model", "load", "train", "__version__"]
