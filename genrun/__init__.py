"""genrun: a Hydra-driven PyTorch experiment runner built around GeN (Bu & Xu, ICLR 2025).

`from genrun.gen import GeN` is the step-size module; `genrun` on the command line runs
experiments through one shared engine (`genrun.engine.train`).
"""

__version__ = "0.1.0"
