"""Old path of adapters.runtime.run_guard: patched main.py files name RunGuard here (0011, 09)."""
from adapters.runtime.run_guard import *  # noqa: F401,F403
