#!/bin/bash
# Test-only wrapper for `albef_command`: runs the command, then, in a multi-task srun step, keeps
# rank ALBEF_TEST_SLOW_RANK (default 0: the one that writes the preemption marker) alive
# ALBEF_TEST_SLOW_EXIT_S seconds (default 120) longer, so the ranks of a step exit at different
# times. With KillOnBadExit=1 the first rank to exit non-zero (75) gets the slow one killed: the
# requeue must still happen (the sbatch scripts decide from the marker, not from srun's code).
# The linger is long (120 s) so that on a loaded machine the other rank's exit still comes first
# (it then costs nothing: the kill ends it); a rank that exits 0 does not linger.
# srun forwards the preemption USR1 to every process of the task, this shell included: a trap (not
# an ignore, which the command would inherit) keeps the wrapper alive while the command handles it.
trap ':' USR1
"$@" &
child=$!
while true; do
    wait "$child"
    rc=$?
    if [[ $rc -gt 128 ]] && kill -0 "$child" 2>/dev/null; then continue; fi  # the trap interrupted wait
    break
done
if [[ $rc -ne 0 && ${SLURM_STEP_NUM_TASKS:-1} -gt 1 && ${SLURM_PROCID:-0} -eq ${ALBEF_TEST_SLOW_RANK:-0} ]]; then
    echo "slow_rank_exit: rank $SLURM_PROCID exited $rc; lingering ${ALBEF_TEST_SLOW_EXIT_S:-120} s" >&2
    sleep "${ALBEF_TEST_SLOW_EXIT_S:-120}"
fi
exit "$rc"
