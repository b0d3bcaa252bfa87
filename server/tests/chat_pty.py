"""Drive `purehw chat` through a pseudo-terminal, as a person at a terminal would.

usage: chat_pty.py [--twice] PUREHW_BINARY [ARGS...]   (server/tests/chat.rs runs it: ARGS = chat ...)

The program runs as the session leader of a new pty (Python's `pty.fork`), so its stdin, stdout
and stderr are a terminal and a \\x03 written to the master is turned into SIGINT by the line
discipline, exactly as Ctrl-C at a keyboard. Greedy decoding (the caller passes
--temperature 0) makes the replies checkable.

The scenario: a two-turn chat whose second turn refers to the first (the first names Paris, the
second reuses the cached conversation), Ctrl-C at the prompt (a hint, still running), `/clear`,
Ctrl-C during a long reply (the reply stops, the prompt comes back, the next line is answered),
a \"\"\" block, then `/exit` with status 0. With --twice: a half-typed line, then Ctrl-C twice
at the prompt leaves with status 0 (and the line is never sent). Exits 0 when every check passes;
otherwise prints the failed check and the transcript and exits 1.
"""

import os
import pty
import re
import select
import sys
import time

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
STATS = re.compile(r"prompt (\d+) tokens \((\d+) cached\), \S+ tok/s · reply (\d+) tokens, [^\n]*\n")
PROMPT = ">>> "


class Fail(Exception):
    pass


class Pty:
    def __init__(self, argv):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            try:
                os.execv(argv[0], argv)
            finally:
                os._exit(127)
        self.buf = ""  # everything read, escapes stripped, \r\n as \n
        self.pos = 0  # where the next expect() starts looking

    def read_some(self, timeout):
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        if not data:
            raise Fail("the program closed the terminal (exited?)")
        text = data.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")
        self.buf += ANSI.sub("", text)
        return True

    def expect(self, pattern, timeout, what):
        """Wait for `pattern` (a regex) after the current position; move past it; return the match."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        end = time.monotonic() + timeout
        while True:
            m = rx.search(self.buf, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = end - time.monotonic()
            if left <= 0:
                raise Fail(f"timed out after {timeout}s waiting for {what} ({rx.pattern!r})")
            self.read_some(left)

    def send(self, s):
        os.write(self.fd, s.encode())

    def wait_exit(self, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                self.read_some(0.1)
            except Fail:
                time.sleep(0.05)
        raise Fail(f"the program did not exit within {timeout}s")


def turn(p, line, timeout=90):
    """Send one line; wait for its reply's stats line and the next prompt. (reply text, stats)."""
    p.send(line + "\n")
    # The terminal echoes the line; the reply starts after it.
    p.expect(re.escape(line.splitlines()[-1]) + r"\n", 10, f"the echo of {line!r}")
    start = p.pos
    m = p.expect(STATS, timeout, f"the stats line after {line!r}")
    # Lines typed ahead of their prompt leave the continuation prompts before the reply.
    reply = re.sub(r"^(\.\.\. )+", "", p.buf[start : m.start()].strip())
    p.expect(re.escape(PROMPT), 10, "the prompt after a reply")
    print(f"--- {line!r} -> {reply!r}\n    {m.group(0).strip()}", flush=True)
    return reply, m


def scenario(p):
    p.expect(r"/help for commands", 120, "the banner (model loaded)")
    p.expect(re.escape(PROMPT), 10, "the first prompt")

    reply, _ = turn(p, "What is the capital of France?")
    if "Paris" not in reply:
        raise Fail(f"turn 1 should name Paris: {reply!r}")
    reply, m = turn(p, "And of Germany?")
    if not reply:
        raise Fail("turn 2 gave an empty reply")
    prompt_tokens, cached = int(m.group(1)), int(m.group(2))
    # Turn 2's prompt is turn 1's conversation plus a message: most of it comes from the cache.
    if cached < 20 or prompt_tokens >= 30:
        raise Fail(f"turn 2 should reuse turn 1's cache: {m.group(0)!r}")

    # Ctrl-C at the prompt: a hint, and the chat goes on.
    p.send("\x03")
    p.expect(r"Ctrl-C again", 10, "the hint after Ctrl-C at the prompt")
    p.expect(re.escape(PROMPT), 10, "the prompt after the hint")

    p.send("/clear\n")
    p.expect(r"\(conversation cleared\)", 10, "/clear's note")
    p.expect(re.escape(PROMPT), 10, "the prompt after /clear")

    # Ctrl-C during a long reply: once some of it has been printed.
    line = "Write a long story about a dragon who learns to fly."
    p.send(line + "\n")
    p.expect(re.escape(line) + r"\n", 10, "the echo of the story request")
    start = p.pos
    end = time.monotonic() + 60
    while len(p.buf[start:].strip()) < 40:
        if time.monotonic() > end:
            raise Fail("the story reply did not start within 60s")
        p.read_some(end - time.monotonic())
    p.send("\x03")
    m = p.expect(STATS, 30, "the stats line after Ctrl-C during a reply")
    print(f"--- story, interrupted -> {p.buf[start:m.start()].strip()!r}\n    {m.group(0).strip()}", flush=True)
    if "stopped" not in m.group(0):
        raise Fail(f"the reply should say it was stopped: {m.group(0)!r}")
    p.expect(re.escape(PROMPT), 10, "the prompt after an interrupted reply")
    if p.buf[p.pos :].strip():
        raise Fail(f"output after the prompt: {p.buf[p.pos:]!r}")

    # Still chatting: a plain line, then a multi-line block.
    reply, m = turn(p, "What is 2 + 2?")
    if not reply:
        raise Fail("no reply after the interrupted one")
    # After /clear the conversation restarts: the cache still holds the system prompt's tokens.
    reply, _ = turn(p, '"""\nName a colour.\nAnswer in one word."""')
    if not reply:
        raise Fail("no reply to the block")

    p.send("/exit\n")
    code = p.wait_exit(20)
    if code != 0:
        raise Fail(f"/exit should end with status 0, got {code}")


def scenario_twice(p):
    p.expect(r"/help for commands", 120, "the banner (model loaded)")
    p.expect(re.escape(PROMPT), 10, "the first prompt")
    p.send("half-typed")
    p.expect(r"half-typed", 10, "the echo of the half-typed line")
    p.send("\x03")
    p.expect(r"Ctrl-C again", 10, "the hint after Ctrl-C at the prompt")
    p.expect(re.escape(PROMPT), 10, "the prompt after the hint")
    p.send("\x03")
    code = p.wait_exit(20)
    if code != 0:
        raise Fail(f"a second Ctrl-C should end the chat with status 0, got {code}")
    if STATS.search(p.buf):
        raise Fail("the half-typed line was answered")


def main():
    args = sys.argv[1:]
    run = scenario
    if args and args[0] == "--twice":
        run, args = scenario_twice, args[1:]
    p = Pty(args)
    try:
        run(p)
    except Fail as e:
        print(f"FAILED: {e}\n--- transcript ---\n{p.buf}\n--- end ---", flush=True)
        try:
            os.kill(p.pid, 9)
            os.waitpid(p.pid, 0)
        except OSError:
            pass
        sys.exit(1)
    print(f"--- transcript ---\n{p.buf}\n--- end ---\nok", flush=True)


if __name__ == "__main__":
    main()
