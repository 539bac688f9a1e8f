"""The docs as tests: every fenced `sh` and `python` block of README.md and docs/*.md runs.

Each document runs in a fresh temporary folder laid out like the repository (its own
copy of configs/, with scripts/ and the .venv linked), so `mesh up` there starts a mesh
of its own: every port the documents name (those of configs/local.toml, the stand-in's
8700, any `port = N` of a written config) is replaced, in files, commands and expected
output alike, by a free port of as many digits. Blocks run in document order and share
the folder; an `export NAME=VALUE` line carries over to later blocks. Every process is
bounded by a timeout, and every pid a background block printed is killed at the end.

What a block's info string says (the words after the language):

    ```sh                      run it with bash -e; it must exit 0
    ```sh no-run: REASON       not run, for the reason given (several hosts, root, ...)
    ```sh background           one long-running command (`mesh up`): started, its shown
                               output waited for, stopped (SIGTERM) when the document ends
    ```python                  run with the mesh's python, from the document's folder
    ```python file=PATH        not run: written to PATH, for later blocks to use
    ```toml file=PATH          likewise
    ```output                  the expected output of the block just before it

In an `sh` block whose lines start with `$ `, each such line is a command and the lines
after it, up to the next `$ `, are its expected output; a command shown with no output
must exit 0. Output (stdout and stderr together) must match in full, with `...` standing
for any text, as in doctest's ELLIPSIS.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
RUNNABLE = ("sh", "python")
COMMAND_TIMEOUT_S = 60.0
BACKGROUND_TIMEOUT_S = 30.0
FENCE = re.compile(r"^```(.*)$")


@dataclass
class Block:
    doc: str
    line: int
    lang: str
    attrs: dict
    text: str
    output: str | None = None  # from a following ```output block

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def parse(doc: str) -> list[Block]:
    """Every fenced block of a document, with its language and attributes."""
    lines = (ROOT / doc).read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        info = m.group(1).strip()
        start = i + 1
        j = start
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        text = "\n".join(lines[start:j]) + "\n"
        lang, _, rest = info.partition(" ")
        attrs: dict = {}
        rest = rest.strip()
        if rest.startswith("no-run"):
            attrs["no-run"] = rest[len("no-run"):].lstrip(":").strip()
        else:
            for word in rest.split():
                key, _, value = word.partition("=")
                attrs[key] = value or True
        if lang == "output" and blocks:
            blocks[-1].output = text
        else:
            blocks.append(Block(doc, start, lang, attrs, text))
        i = j + 1
    return blocks


def test_every_block_runs_or_says_why():
    """A block that is not run names its reason; attributes are ones the runner knows."""
    known = {"no-run", "background", "file"}
    problems = []
    for doc in DOCS:
        for b in parse(doc):
            if b.lang not in RUNNABLE and "file" not in b.attrs:
                continue
            if "no-run" in b.attrs and not b.attrs["no-run"]:
                problems.append(f"{b.where}: no-run without a reason")
            unknown = set(b.attrs) - known
            if unknown:
                problems.append(f"{b.where}: unknown attribute {sorted(unknown)}")
    assert not problems, "\n".join(problems)


# --- a document's own folder and ports -------------------------------------------------------

def free_port(digits: int, taken: set[int]) -> int:
    """A free TCP port on loopback with `digits` digits (so tables keep their widths)."""
    import random
    low, high = max(1024, 10 ** (digits - 1)), min(65535, 10 ** digits - 1)
    for _ in range(500):
        port = random.randint(low, high)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise RuntimeError(f"no free {digits}-digit port")


PORT_IN_TEXT = re.compile(r"(?:\bport\s*=\s*|127\.0\.0\.1:)(\d{2,5})\b")


class Ports:
    def __init__(self, texts: list[str]):
        documented = sorted({int(p) for t in texts for p in PORT_IN_TEXT.findall(t)})
        taken: set[int] = set(documented)
        self.map = {p: free_port(len(str(p)), taken) for p in documented}
        self.rx = re.compile(r"(?<![\d.])(" + "|".join(map(str, documented)) + r")(?!\d)") if documented else None

    def __call__(self, text: str) -> str:
        if self.rx is None:
            return text
        return self.rx.sub(lambda m: str(self.map[int(m.group(1))]), text)


def make_folder(tmp: Path, ports: Ports) -> Path:
    work = tmp / "work"
    (work / "configs").mkdir(parents=True)
    for cfg in (ROOT / "configs").glob("*.toml"):
        (work / "configs" / cfg.name).write_text(ports(cfg.read_text()))
    for name in ("scripts", "docs", "README.md", "pyproject.toml", ".venv"):
        if (ROOT / name).exists():
            (work / name).symlink_to(ROOT / name)
    return work


def doc_env(work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_") and k != "PYTHONPATH"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = str(ROOT)  # the mesh itself, also when it is not installed
    env["HOME"] = str(work.parent)
    return env


# --- matching ---------------------------------------------------------------------------------

def normal(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def matches(expected: str, actual: str) -> bool:
    parts = [re.escape(p) for p in normal(expected).split("...")]
    return re.fullmatch(".*?".join(parts), normal(actual), re.DOTALL) is not None


# --- processes --------------------------------------------------------------------------------

PID = re.compile(r"\bpid (\d+)")


def kill_group(pid: int) -> None:
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            break


def run(cmd: list[str], work: Path, env: dict, stdin: str | None = None) -> tuple[int, str]:
    """Run one command in its own session; past the timeout its whole group is killed."""
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(stdin, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        out, _ = proc.communicate()
        return -999, out + f"\n[killed after {COMMAND_TIMEOUT_S:g}s]"
    finally:
        kill_group(proc.pid)  # anything it left running in its session
    return proc.returncode, out


class Background:
    """One long-running command; its output is read as it comes."""

    def __init__(self, command: str, work: Path, env: dict):
        self.command = command
        self.proc = subprocess.Popen(["bash", "-c", "exec " + command], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.pids = {self.proc.pid}
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.pids.update(int(p) for p in PID.findall(line))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_for(self, expected: str) -> None:
        """Until the output so far matches `expected` (which may end anywhere in it)."""
        deadline = time.monotonic() + BACKGROUND_TIMEOUT_S
        with self.cond:
            while True:
                if matches(expected + "...", "\n".join(self.lines)):
                    return
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and self.proc.stdout.closed):
                    raise AssertionError(f"`{self.command}` did not print what the doc shows; it printed:\n"
                                         + "\n".join(self.lines))
                self.cond.wait(min(left, 1.0))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        for pid in self.pids:  # the launcher's nodes and helpers run in sessions of their own
            kill_group(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.proc.poll() is None:
            self.proc.wait(10)


# --- running a document -----------------------------------------------------------------------

EXPORT = re.compile(r"^\s*export\s+([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def console(text: str) -> list[tuple[str, str | None]] | None:
    """`$ command` lines with the output shown after each; None if the block has none."""
    lines = text.rstrip("\n").splitlines()
    if not any(line.startswith("$ ") for line in lines):
        return None
    steps: list[tuple[str, list[str]]] = []
    for line in lines:
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line)
    return [(cmd, "\n".join(out) if out else None) for cmd, out in steps]


def check(block: Block, what: str, code: int, out: str, expected: str | None) -> None:
    if expected is not None:
        assert matches(expected, out), (f"{block.where}: `{what}` printed other than the doc shows.\n"
                                        f"--- the doc shows:\n{expected}\n--- it printed (exit {code}):\n{out}")
    else:
        assert code == 0, f"{block.where}: `{what}` exited {code}:\n{out}"


def run_doc(doc: str, tmp: Path) -> None:
    blocks = parse(doc)
    runnable = [b for b in blocks if (b.lang in RUNNABLE or "file" in b.attrs) and "no-run" not in b.attrs]
    if not runnable:
        pytest.skip(f"{doc} has no block to run")
    ports = Ports([(ROOT / "configs" / "local.toml").read_text()] + [b.text for b in blocks if "file" in b.attrs])
    work = make_folder(tmp, ports)
    env = doc_env(work)
    background: list[Background] = []
    try:
        for b in runnable:
            text = ports(b.text)
            expected = ports(b.output) if b.output is not None else None
            if "file" in b.attrs:
                path = work / b.attrs["file"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            elif b.lang == "python":
                code, out = run([sys.executable, "-"], work, env, stdin=text)
                check(b, "python block", code, out, expected)
            elif "background" in b.attrs:
                steps = console(text) or [(text.strip(), expected)]
                assert len(steps) == 1, f"{b.where}: a background block holds one command"
                cmd, shown = steps[0]
                proc = Background(cmd, work, env)
                background.append(proc)
                proc.wait_for(shown or "")
            else:
                steps = console(text)
                if steps is None:
                    code, out = run(["bash", "-e", "-o", "pipefail", "-c", text], work, env)
                    check(b, text.strip().splitlines()[0], code, out, expected)
                else:
                    for cmd, shown in steps:
                        code, out = run(["bash", "-e", "-o", "pipefail", "-c", cmd], work, env)
                        check(b, cmd, code, out, shown)
                for line in text.splitlines():
                    m = EXPORT.match(line.removeprefix("$ "))
                    if m:
                        env[m.group(1)] = " ".join(shlex.split(m.group(2)))
    finally:
        for proc in reversed(background):
            proc.stop()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("doc", DOCS)
def test_doc_runs_as_written(doc, tmp_path):
    run_doc(doc, tmp_path)
