"""``python -m MODULE ARGS`` for several argument lists, from one process:
``python tests/app_batch.py MODULE < cases.json`` prints one JSON result per
case (``returncode``, ``stdout``, ``stderr``).

The process imports what every app imports (JAX, Flax, Orbax, the package)
once, without starting a JAX backend, then forks one child per case.  The
child runs MODULE as ``__main__`` with ``sys.argv = [MODULE, *args]`` (what
``python -m`` does) and its file descriptors 1 and 2 written to files, so each
case starts from unparsed flags and an untouched JAX, as a fresh process
would, without paying the ~2 s of imports again.  For tests of input that
the apps refuse before training (conftest.run_app_cases).
"""

import importlib
import json
import os
import runpy
import sys
import tempfile
import traceback


def _child(module: str, args: list, out: int, err: int) -> None:
  os.dup2(out, 1)
  os.dup2(err, 2)
  sys.argv = [module, *args]
  code = 0
  try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
  except SystemExit as e:
    if isinstance(e.code, str):
      print(e.code, file=sys.stderr)
      code = 1
    else:
      code = e.code or 0
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def main() -> None:
  module = sys.argv[1]
  cases = json.load(sys.stdin)
  sys.path.insert(0, os.getcwd())
  importlib.import_module("experiments.common")  # the imports every app shares, once
  results = []
  for args in cases:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
      sys.stdout.flush()
      sys.stderr.flush()
      pid = os.fork()
      if pid == 0:
        _child(module, args, out.fileno(), err.fileno())
      _, status = os.waitpid(pid, 0)
      code = os.waitstatus_to_exitcode(status)
      text = []
      for f in (out, err):
        f.seek(0)
        text.append(f.read().decode(errors="replace"))
    results.append({"returncode": code, "stdout": text[0], "stderr": text[1]})
  json.dump(results, sys.stdout)


if __name__ == "__main__":
  main()
