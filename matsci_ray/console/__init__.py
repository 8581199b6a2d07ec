"""What ``train``, ``study`` and ``demo`` print while they run.

One line per epoch of a training run (:mod:`.run`, followed from the run's ``history.jsonl``),
a table of a study's trials (:mod:`.study`, a Ray Tune callback), and Ray's own logs in a file
beside the results instead of on the console (:mod:`.ray_logs`); ``--verbose`` keeps Ray's
console as Ray prints it. On a terminal the live parts redraw in place (:mod:`.text`).
"""
