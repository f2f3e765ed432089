"""Old path of adapters.evaluation.records, until scripts/seed_summary.py imports the new one."""
from adapters.evaluation.records import *  # noqa: F401,F403
