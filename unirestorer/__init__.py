"""unirestorer: all-in-one image restoration by a multi-granularity mixture of experts.

The design card's top-level folders (`data_shards/`, `model/`, `parallel/`, `train/`, `launch/`)
are installed as subpackages of this namespace: `unirestorer.model`, `unirestorer.train`, ...
"""

__version__ = "0.1.0"
