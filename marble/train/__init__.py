"""The `train` stage: rollouts of the old policy, per-reward advantages, the balanced NFT update.

Entry point: `marble.train.trainer.run_training(cfg, prompts_dir, out_dir, reward_cache=None)`.
"""
