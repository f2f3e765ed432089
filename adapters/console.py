"""Old path of adapters.runtime.console: patched main.py files import it (patches 0021, 11)."""
from adapters.runtime.console import *  # noqa: F401,F403
