"""Adapters that put the hybrid objective and the shared teacher inside engines people
already scale with. They import the client, the ops and the objective, never the other
way round, and each engine is an optional extra:

    pip install -e ".[trl]"
    from trainer.integrations.trl_trainer import HybridConfig, HybridGRPOTrainer

Modules: trl_trainer.py (the TRL GRPO trainer with the hybrid loss), trl_layout.py (TRL's
rollout tensors -> the trainer's batch layout, the student's top-K, the Dense support),
trl_rewards.py (the project's rewards as TRL reward functions). docs/integrations.md says
how to switch from TRL's GRPO, run on several nodes and turn on vLLM rollouts.
"""
