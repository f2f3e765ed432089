"""Old path of adapters.runtime.safe_load: latent-diffusion's patched main.py imports it (0010)."""
from adapters.runtime.safe_load import *  # noqa: F401,F403
