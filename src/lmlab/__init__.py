"""lmlab: a laboratory for language models.

>>> import lmlab
>>> lm = lmlab.load("runs/demo")
>>> lm.generate("ROMEO:", top_p=0.9, seed=0)
"""

from lmlab.api import LM, load, train
from lmlab.version import __version__

__all__ = ["LM", "__version__", "load", "train"]
