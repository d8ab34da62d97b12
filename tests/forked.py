"""Jobs that each need a process of their own but the same imports: one process does the imports, then forks a child
per job, so every job starts from the state a fresh process has after those imports, without paying for them again
(torch, diffusers and a pipeline's model classes take 5-8 s to import, the jobs themselves a few seconds).

    results = run_forked("import torch, benchmark", {"a": ("print(1)", [])}, cwd=REPO_ROOT)
    results["a"].returncode, results["a"].stdout

Children run one after another, never at the same time. The prelude should import and set up only (no tensor op, no
progress bar): then no thread of the parent is busy at a fork, holding a lock the child would wait on forever.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback


def run_forked(prelude: str, jobs: dict[str, tuple[str, list[str]]], cwd: str, env: dict | None = None,
               timeout: int = 300) -> dict[str, subprocess.CompletedProcess]:
    """`prelude` in a new Python process, then each job's code (with its sys.argv) in a child forked from it. A job
    that runs past `timeout` seconds is killed (SIGALRM); the exit status and output of each job, by name."""
    with tempfile.TemporaryDirectory(prefix="forked-") as out:
        spec = {"prelude": prelude, "jobs": jobs, "timeout": timeout, "out": out}
        proc = subprocess.run([sys.executable, "-m", "tests.forked"], input=json.dumps(spec), cwd=cwd,
                              env=env, capture_output=True, text=True, timeout=timeout * (len(jobs) + 1))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        with open(os.path.join(out, "status.json")) as f:
            status = json.load(f)
        results = {}
        for name in jobs:
            with open(os.path.join(out, f"{name}.out")) as o, open(os.path.join(out, f"{name}.err")) as e:
                results[name] = subprocess.CompletedProcess([name], status[name], o.read(), e.read())
        return results


def run_job(code: str, argv: list[str], namespace: dict, out: str, name: str, timeout: int) -> None:
    """In the forked child: the job with its output in files, then the child's exit, skipping the parent's cleanup
    (os._exit: an exception or SystemExit sets the status, as in a process of its own)."""
    status = 1
    try:
        for fd, suffix in ((1, "out"), (2, "err")):
            os.dup2(os.open(os.path.join(out, f"{name}.{suffix}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        signal.alarm(timeout)
        sys.argv = argv
        exec(compile(code, f"<{name}>", "exec"), dict(namespace))
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def main() -> None:
    spec = json.load(sys.stdin)
    namespace = {"__name__": "__main__"}
    exec(compile(spec["prelude"], "<prelude>", "exec"), namespace)
    status = {}
    for name, (code, argv) in spec["jobs"].items():
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_job(code, argv, namespace, spec["out"], name, spec["timeout"])
        status[name] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    with open(os.path.join(spec["out"], "status.json"), "w") as f:
        json.dump(status, f)


if __name__ == "__main__":
    main()
