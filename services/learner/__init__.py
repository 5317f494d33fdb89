"""Learner: admits prompts, trains GRPO steps on scored groups, pushes weights."""
