"""Training, the only package in finetune that imports accelerate: the one loop (loop.py), where it starts
(start.py: the accelerator and the session), the state it carries (state.py) and what it is built from: run-time settings decided once (runtime.py), the global batch split over
processes (batching.py), launch checks (launch.py), checkpoints
(checkpoint.py), the fault contract across processes (faults.py), scoring on every process
(evaluate.py), everything one run trains with (session.py; the loss, metrics and reports are the
task's, finetune/tasks/), the input pipeline it feeds from (inputs.py),
and the cached features of a body that never changes (features.py). The LR range test (lrfind.py) and
the throughput benchmark (bench.py) run the loop's own training step; `finetune eval` scores an export
on every process with the loop's accelerator (evalrun.py). The run directory it writes into is
finetune/rundir's.

May import every stage below it (recipe, data, reporting, tasks, model, rundir); only the entry points (api.py,
cli.py) import training.
"""
