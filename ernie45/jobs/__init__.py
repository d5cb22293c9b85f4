"""The jobs ERNIE 4.5 is put to, built on the engine: video moderation with the sound track (`moderate`)."""

from .moderate import Policy, load_policy, moderate

__all__ = ["Policy", "load_policy", "moderate"]
