"""MoBA (Mixture of Block Attention): the op, its spec, and its transformers plug-in.

Knows nothing of files, prompts or citations. Layout everywhere in this package:
[B, H, T, D] (the transformers attention layout); the queries are the last Tq of Tk keys.
"""

from moba.capture import RoutingRecorder, capture_routing
from moba.naive import naive_moba_attention
from moba.ops import BACKENDS, dense_attention, moba_attention, moba_routing, set_backend
from moba.portable import portable_moba_attention
from moba.routing import block_means
from moba.types import MobaKernel, Routing

__all__ = [
    "BACKENDS",
    "MobaKernel",
    "Routing",
    "block_means",
    "dense_attention",
    "RoutingRecorder",
    "capture_routing",
    "moba_attention",
    "moba_routing",
    "naive_moba_attention",
    "portable_moba_attention",
    "set_backend",
]

try:
    import transformers as _transformers  # noqa: F401
except ImportError:  # the op works without transformers; only the plug-in needs it
    pass
else:
    from moba import hf as _hf

    _hf.register()
