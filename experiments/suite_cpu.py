"""Where the test suite's CPU time goes: a pytest plugin and its report.

Wall times (`--durations`) mislead on a shared 2-core machine; CPU time (this process and the child
processes it waited for: trainer runs, notebook kernels that exit) does not depend on what else runs.

    PYTHONPATH=experiments .venv/bin/python -m pytest -q -n 2 --dist loadfile -p suite_cpu
    python experiments/suite_cpu.py /tmp/jaxcl-suite-cpu.tsv          # per file, then the top tests

`SUITE_CPU_OUT` names the file the workers append to (default /tmp/jaxcl-suite-cpu.tsv; remove it first).
"""

from __future__ import annotations

import collections
import os
import resource
import sys
import time

OUT = os.environ.get("SUITE_CPU_OUT", "/tmp/jaxcl-suite-cpu.tsv")


def _cpu() -> tuple[float, float]:
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


try:
  import pytest

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(item, nextitem):  # noqa: ARG001  (pytest's hook signature)
    """Appends `node id, own CPU s, children's CPU s, wall s` of the test (setup, call, teardown)."""
    own, children, start = *_cpu(), time.time()
    yield
    own_after, children_after = _cpu()
    with open(OUT, "a") as f:
      f.write(f"{item.nodeid}\t{own_after - own:.3f}\t{children_after - children:.3f}\t{time.time() - start:.3f}\n")
except ImportError:  # the report needs no pytest
  pass


def report(path: str, top: int = 40) -> str:
  rows = [line.rstrip("\n").split("\t") for line in open(path)]
  per_file, per_test = collections.Counter(), []
  for node, own, children, wall in rows:
    cpu = float(own) + float(children)
    per_file[node.split("::")[0]] += cpu
    per_test.append((cpu, float(wall), node))
  lines = [f"{len(rows)} tests, {sum(per_file.values()):.0f} CPU s", "", "CPU s  file"]
  lines += [f"{cpu:6.0f}  {name}" for name, cpu in per_file.most_common(top)]
  lines += ["", "CPU s  wall s  test"]
  lines += [f"{cpu:6.1f}  {wall:6.1f}  {node}" for cpu, wall, node in sorted(per_test, reverse=True)[:top]]
  return "\n".join(lines)


if __name__ == "__main__":
  print(report(sys.argv[1] if len(sys.argv) > 1 else OUT))
