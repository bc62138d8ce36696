"""The tests' launcher helper kills a hung run whole, workers in sessions of their own included (as torchrun's are),
so a hang fails its test instead of holding the test session forever."""
import os
import subprocess
import sys
import time

from process_tree import kill_tree, output_after_kill

LAUNCHER = r'''
import subprocess, sys, time
# a worker in a session of its own that holds the inherited stdout, as torchrun's workers do
child = subprocess.Popen([sys.executable, "-c", "import time; print('worker up', flush=True); time.sleep(600)"],
                         start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
'''


def test_a_hung_launcher_and_its_own_session_workers_are_killed():
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines = [proc.stdout.readline(), proc.stdout.readline()]  # the worker's pid, and the worker itself up
    worker = int(next(line for line in lines if line.strip().isdigit()))
    t0 = time.monotonic()
    kill_tree(proc)
    output_after_kill(proc)  # returns: nothing holds the pipe any more
    assert time.monotonic() - t0 < 20 and any("worker up" in line for line in lines)
    for _ in range(50):  # reaped by init shortly after the kill
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"worker {worker} survived the kill")
