"""Models shared by several roles: the Bradley-Terry reward models (trained by the learner, served by the
reward server) and the tiny Qwen2-VL builder used by tests and the judge."""
