"""The process exit codes of every stage (README "Exit codes"; the SLURM templates rely on them)."""

FINISHED_EXIT_CODE = 0
FAILED_EXIT_CODE = 1  # any error, including a non-finite loss (fp32/bf16); the last good checkpoint is kept
CONFIG_ERROR_EXIT_CODE = 2  # bad configuration or input, reported before anything is written
# EX_TEMPFAIL (sysexits.h): "temporary failure, try again later". The SLURM templates test for it.
PREEMPTED_EXIT_CODE = 75
