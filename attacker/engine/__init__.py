"""The attack engine: one optimisation loop for every "find inputs whose simulated update matches the observed one"
attack, assembled from parts chosen by name.

Parts
- simulated update: :class:`VictimSimulator` replays the client's local SGD steps (FedSGD is one step), so the
  simulated update is differentiable in the candidate inputs;
- search space (:data:`SEARCH_SPACES`): what is optimised (pixels; pixels and soft labels) and how it is projected;
- matching objective (:data:`OBJECTIVES`): cosine, L2, per-layer cosine, masked cosine;
- regularisers (:data:`REGULARIZERS`): total variation, L2 image prior, BatchNorm fidelity, group consistency,
  feature matching;
- optimiser (:data:`OPTIMIZERS`): Adam on signed gradients with step decay, Adam, L-BFGS (batched per candidate).

One module per part (simulator, objectives, regularizers, spaces, optimizers), the problem and the settings
(problem, spec) and the loop with its executors (loop); this package exports them all.

Independent problems (images or clients that share the public model) and restarts are stacked as candidates
``[P, R, ...]``. They run as one computation (``vmap`` over problems around ``vmap`` over restarts) or one after
another with plain autograd, whichever is faster for the victim (``EngineSpec.batching``).
"""

from .loop import AttackEngine
from .objectives import OBJECTIVES, cosine_distance
from .optimizers import OPTIMIZERS, AdamOptimizer, BatchedLBFGS, OptimizerSpec
from .problem import InversionProblem, JointProblem
from .regularizers import CONSENSUS, REGULARIZERS, CandidateContext, bn_fidelity, epoch_invariant, lazy_consensus, registered_consensus, total_variation
from .simulator import Tensors, VictimSimulator
from .spaces import SEARCH_SPACES, PixelAndLabelSpace, PixelSpace, SearchSpace
from .spec import BATCHING, EngineResult, EngineSpec, GroupSpec, check_compile, update_fit

__all__ = ["AttackEngine", "OBJECTIVES", "cosine_distance", "OPTIMIZERS", "AdamOptimizer", "BatchedLBFGS",
           "OptimizerSpec", "InversionProblem", "JointProblem", "CONSENSUS", "REGULARIZERS", "CandidateContext",
           "bn_fidelity", "epoch_invariant", "lazy_consensus", "registered_consensus", "total_variation", "Tensors", "VictimSimulator",
           "SEARCH_SPACES", "PixelAndLabelSpace", "PixelSpace", "SearchSpace", "BATCHING", "EngineResult",
           "EngineSpec", "GroupSpec", "check_compile", "update_fit"]
