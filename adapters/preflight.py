"""Old path of adapters.runtime.preflight: patched main.py files import it (patches 0018, 11)."""
from adapters.runtime.preflight import *  # noqa: F401,F403
