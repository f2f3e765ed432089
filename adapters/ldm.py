"""Old path of adapters.integrations.ldm: saved run configs and records name adapters.ldm.RotationVQModel."""
from adapters.integrations.ldm import *  # noqa: F401,F403
