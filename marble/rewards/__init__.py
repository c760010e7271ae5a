"""Rewards: the `Reward` protocol, a registry by config `kind`, offline and model rewards, caching.

Heavy modules (transformers, open_clip) are imported only when a model reward is built.
"""

from marble.rewards.base import BaseReward, Reward, RewardOutput
from marble.rewards.registry import REWARD_KINDS, build_reward, build_rewards, score_all

__all__ = [
    "REWARD_KINDS",
    "BaseReward",
    "Reward",
    "RewardOutput",
    "build_reward",
    "build_rewards",
    "score_all",
]
