"""The lab without Docker: the compose topology (hostd and guests running the agent beside a
workload) in plain memory cgroups with swap, and the paper's experiments on it.

spec.py is pure (the lab file, the processes' command lines and environments); cgroups.py and
runner.py do the I/O; experiments/ runs the paper's experiments on real guests."""
