"""Old path of adapters.evaluation.data: saved configs and records name adapters.data.PhotoCrops etc."""
from adapters.evaluation.data import *  # noqa: F401,F403
