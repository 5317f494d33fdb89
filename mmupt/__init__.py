"""mmupt: label-free post-training of multimodal LLMs (MM-UPT) as rollout / voter / learner services."""
__version__ = "0.1.0"
