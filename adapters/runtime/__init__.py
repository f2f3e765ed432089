"""What surrounds a training or evaluation run: the modules the patched upstream ``main.py`` files call.

- ``preflight``: what a user must fix (GPU, data, LPIPS weights) found before anything is built, one line each;
- ``run_guard``: step-interval ``last.ckpt``, save and exit on SIGTERM/SIGUSR1, atomic finite-only writes;
- ``safe_load``: weights-only checkpoint loading with an explicit allowlist;
- ``console``: CPU threads, a quiet console, the end-of-run summary;
- ``errors``: the project's user errors, which the patched ``main.py`` files print as one line.

Named for what they share rather than "safety": the console and the errors make a run readable, not safe. Nothing
is imported here, so ``import adapters.runtime.errors`` stays light.
"""
