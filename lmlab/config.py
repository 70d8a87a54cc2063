"""The old home of the model configs, kept so that ``from lmlab.config import ...`` works.

The configs live in :mod:`lmlab.models.config`, beside the models they describe.
"""

from lmlab.models.config import *  # noqa: F401,F403
from lmlab.models.config import __all__  # noqa: F401
