"""lmlab: a laboratory for language models.

>>> import lmlab
>>> lm = lmlab.load("runs/demo")
>>> lm.generate("ROMEO:", top_p=0.9, seed=0)
"""

from lmlab.api import LM, load, train

__version__ = "0.1.0"
__all__ = ["LM", "load", "train"]
