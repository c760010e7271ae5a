"""Pure math of marble's RL core (torch, numpy, osqp only; no models, no files).

advantages: per-reward group advantages, optimality probability. nft: DiffusionNFT terms, masked
per-reward losses, the affine (ω, ρ) single-backward update. gram: parameter- and output-space Gram.
qp: the min-norm point on the simplex (osqp). balancers: the presets, by `kind`. diagnostics: cosines.
"""

from marble.rl.advantages import AdvantageResult, AdvantageStats, group_advantages, optimality_probability
from marble.rl.balancers import (
    BALANCERS,
    Balancer,
    BalanceStats,
    build_balancer,
    cagrad_coefficients,
    mgda_gamma,
    pcgrad_coefficients,
    register_balancer,
    rescale_to_gamma,
)
from marble.rl.diagnostics import CosineStats, combine_directions, direction_cosines, gram_cosines
from marble.rl.gram import ParamGram, flat_grads, gram_from_output, gram_from_params, normalize_gram
from marble.rl.nft import (
    NFTTerms,
    combine_coefficients,
    combined_loss,
    kl_loss,
    nft_terms,
    per_reward_losses,
    reward_weights,
)
from marble.rl.qp import MinNormSolver, QPResult

__all__ = [
    "BALANCERS",
    "AdvantageResult",
    "AdvantageStats",
    "BalanceStats",
    "Balancer",
    "CosineStats",
    "MinNormSolver",
    "NFTTerms",
    "ParamGram",
    "QPResult",
    "build_balancer",
    "cagrad_coefficients",
    "flat_grads",
    "pcgrad_coefficients",
    "register_balancer",
    "rescale_to_gamma",
    "combine_coefficients",
    "combine_directions",
    "combined_loss",
    "direction_cosines",
    "gram_cosines",
    "gram_from_output",
    "gram_from_params",
    "group_advantages",
    "kl_loss",
    "mgda_gamma",
    "nft_terms",
    "normalize_gram",
    "optimality_probability",
    "per_reward_losses",
    "reward_weights",
]
