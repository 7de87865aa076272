"""genrun: a Hydra-driven PyTorch experiment runner built around GeN (Bu & Xu, ICLR 2025).

`from genrun.gen import GeN` is the step-size module; `genrun` on the command line runs
experiments through one shared engine (`genrun.engine.train`).
"""

from pathlib import Path

__version__ = "0.1.0"

#: The Hydra config groups (the repo's top-level conf/; the install is editable).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
