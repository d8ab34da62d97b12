"""Jobs that each need a process of their own but the same imports: one process does the imports, then forks a child
per job, so every job starts from the state a fresh process has after those imports, without paying for them again
(torch, diffusers and a pipeline's model classes take 5-8 s to import, the jobs themselves a few seconds).

    with Forkserver("import torch, benchmark", cwd=REPO_ROOT) as server:
        run = server.run("a", "print(1)", ["-c"])  # run.returncode, run.stdout, run.stderr

Children run one after another, never at the same time. The prelude should import and set up only (no tensor op, no
progress bar, no compile): then no thread of the parent is busy at a fork, holding a lock the child would wait on
forever, and each child's dynamo has traced nothing, as in a new process.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback


class Forkserver:
    """`prelude` run in a new Python process, which then runs each job sent to it in a child forked from it."""

    def __init__(self, prelude: str, cwd: str, env: dict | None = None):
        self.dir = tempfile.mkdtemp(prefix="forkserver-")
        self.jobs = 0
        with open(os.path.join(self.dir, "server.err"), "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.forked"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, cwd=cwd, env=env, text=True)
        self.request(prelude)

    def request(self, message) -> str:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            with open(os.path.join(self.dir, "server.err")) as f:
                raise RuntimeError(f"the fork server exited: {f.read()[-3000:]}")
        return json.loads(reply)

    def run(self, name: str, code: str, argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
        """`code` with `argv` as sys.argv in a child; killed (SIGALRM) after `timeout` s. Its exit status and output."""
        self.jobs += 1
        stem = os.path.join(self.dir, str(self.jobs))
        status = self.request({"code": code, "argv": argv, "name": name, "stem": stem, "timeout": timeout})
        with open(f"{stem}.out") as out, open(f"{stem}.err") as err:
            return subprocess.CompletedProcess([name, *argv], status, out.read(), err.read())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_job(job: dict, namespace: dict) -> None:
    """In the forked child: the job with its output in files, then the child's exit, skipping the parent's cleanup
    (os._exit: an exception or SystemExit sets the status, as in a process of its own)."""
    status = 1
    try:
        for fd, suffix in ((1, "out"), (2, "err")):
            os.dup2(os.open(f"{job['stem']}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        signal.alarm(job["timeout"])
        sys.argv = job["argv"]
        exec(compile(job["code"], f"<{job['name']}>", "exec"), dict(namespace))
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def serve() -> None:
    """Reads the prelude, then one job a line from stdin; answers each with a line on stdout (the prelude's and the
    jobs' own prints go elsewhere: stderr, and the jobs' files)."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    namespace = {"__name__": "__main__"}
    exec(compile(json.loads(sys.stdin.readline()), "<prelude>", "exec"), namespace)
    print(json.dumps("ready"), file=replies, flush=True)
    for line in sys.stdin:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_job(json.loads(line), namespace)
        print(json.dumps(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])), file=replies, flush=True)
    os._exit(0)  # nothing to clean up: without it, unloading torch and diffusers takes 1.5 s


if __name__ == "__main__":
    serve()
