"""Every exit code the tool's processes end with, on every rank, in one place.

Documented in README ("Exit codes"); DESIGN.md fixes 0, 2 and a distinct code for a partial run.
"""

EXIT_OK = 0  # every planned item done
EXIT_FATAL = 1  # a fault ended the job (a rank died, a load failed, ...)
EXIT_USAGE = 2  # bad input or usage, found before any model was loaded
EXIT_PARTIAL = 3  # the job ran to its end but some items failed (the manifest says which)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's code for Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM (Slurm's time limit, scancel, a requeue)
