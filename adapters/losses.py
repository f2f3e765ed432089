"""Old path of adapters.integrations.losses: saved configs name adapters.losses.VQLPIPSWithDiscriminator."""
from adapters.integrations.losses import *  # noqa: F401,F403
