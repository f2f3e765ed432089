"""Old path of adapters.integrations.vitvqgan: saved configs and records name adapters.vitvqgan.*."""
from adapters.integrations.vitvqgan import *  # noqa: F401,F403
