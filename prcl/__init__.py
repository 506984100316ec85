"""prcl: the pair relevance classification loss, fused so the B×N logit matrix never exists."""
from prcl.contract import default_bias
from prcl.functional import fused_pair_bce

__version__ = "0.1.0"
__all__ = ["fused_pair_bce", "default_bias", "__version__"]
