#!/usr/bin/env python3
"""Drive the page at `/` in a real headless Chromium (Debian's `chromium`), through the DevTools
protocol over a pipe (--remote-debugging-pipe: no extra Python packages, no port).

Checks: the page loads and every request it makes goes to this server; with --api-key it asks
for the key once and then works; a chat message gets a streamed reply; model-like text with
markup stays text; the live plots show the request just made. Saves a screenshot.
Exit 0 and a last line PASS, or a message and exit 1.
"""
import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time


class Browser:
    def __init__(self, chromium):
        self.dir = tempfile.TemporaryDirectory()
        cmd_r, cmd_w = os.pipe()    # we write commands, Chromium reads them on fd 3
        res_r, res_w = os.pipe()    # Chromium writes replies and events on fd 4

        def fds():
            # Out of the way first, so neither dup2 clobbers the other's source.
            a, b = os.dup(cmd_r), os.dup(res_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--window-size=1280,900",
             "--remote-debugging-pipe", f"--user-data-dir={self.dir.name}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=fds,  # kept open past preexec_fn
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(res_w)
        self.w = os.fdopen(cmd_w, "wb", buffering=0)
        self.r = os.fdopen(res_r, "rb", buffering=0)
        self.buf = b""
        self.next_id = 0
        self.events = []
        self.session = None

    def _read(self):
        while b"\0" not in self.buf:
            chunk = self.r.read(65536)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method, params=None, session=True):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        self.w.write(json.dumps(msg).encode() + b"\0")
        while True:
            m = self._read()
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def js(self, expr):
        r = self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r.get("result", {}).get("value")

    def wait(self, expr, timeout, what):
        t = time.time()
        while time.time() - t < timeout:
            v = self.js(expr)
            if v:
                return v
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def close(self):
        try:
            self.send("Browser.close", session=False)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.dir.cleanup()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True, help="http://127.0.0.1:PORT")
    ap.add_argument("--chromium", default="chromium")
    ap.add_argument("--api-key")
    ap.add_argument("--screenshot", required=True)
    ap.add_argument("--timeout", type=float, default=180)
    a = ap.parse_args()
    base = a.base_url.rstrip("/")

    b = Browser(a.chromium)
    try:
        target = b.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        b.session = b.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
        b.send("Network.enable")
        b.send("Page.enable")
        b.send("Runtime.enable")
        b.send("Page.navigate", {"url": base + "/"})
        b.wait("document.readyState === 'complete'", 30, "the page to load")

        if a.api_key:
            b.wait("document.getElementById('keybox').style.display === 'flex'", 30, "the page to ask for the key")
            b.js(f"document.getElementById('key').value = {json.dumps(a.api_key)}; "
                 "document.getElementById('savekey').click(); true")
        b.wait("document.getElementById('model').options.length > 0", 30, "the model list")
        print("models:", b.js("[...document.getElementById('model').options].map(o => o.value).join(', ')"))

        # Markup in a message stays text (no element made, no script run).
        b.js("window.pwned = 0; addMsg('assistant', 'model', '<img src=x onerror=\"window.pwned=1\"><script>window.pwned=2</script><b>bold</b>'); true")
        time.sleep(0.5)
        assert b.js("window.pwned") == 0, "markup in a message ran"
        assert b.js("document.querySelectorAll('#log b, #log img, #log script').length") == 0, "markup became elements"
        b.js("document.getElementById('clear').click(); true")

        # The live view has its first sample (counters to take rates from) before the request.
        b.wait("prev !== null", 30, "the first /v1/stats sample")
        b.js("document.getElementById('temp').value = '0'; document.getElementById('maxtok').value = '48'; "
             "document.getElementById('input').value = 'What is the capital of France?'; "
             "document.getElementById('chat').requestSubmit(); true")
        b.wait("document.querySelector('#log .msg.assistant .meta') !== null", a.timeout, "the streamed reply")
        reply = b.js("document.querySelector('#log .msg.assistant .text').textContent")
        meta = b.js("document.querySelector('#log .msg.assistant .meta').textContent")
        errors = b.js("[...document.querySelectorAll('#log .msg.error')].map(e => e.textContent).join('; ')")
        print(f"reply: {reply!r}\nmeta: {meta!r}")
        assert not errors, f"the chat failed: {errors}"
        assert reply.strip(), "an empty reply"

        # The plots show it: generated tokens/s above zero at some point in the window.
        b.wait("series.tout.pts.some(p => p[1] > 0) && series.tin.pts.some(p => p[1] > 0)", 20,
               "the plots to show the request")
        print("plot values:", b.js("[...document.querySelectorAll('.chart')].map(c => c.textContent).join(' | ')"))
        shot = b.send("Page.captureScreenshot", {"format": "png"})["data"]
        with open(a.screenshot, "wb") as f:
            f.write(base64.b64decode(shot))
        print("screenshot:", a.screenshot)

        urls = [e["params"]["request"]["url"] for e in b.events if e.get("method") == "Network.requestWillBeSent"]
        away = [u for u in urls if not (u.startswith(base + "/") or u == base or u.startswith("data:")
                                        or u.startswith("about:"))]
        print(f"{len(urls)} requests, all to {base}" if not away else f"requests elsewhere: {away}")
        assert urls, "no request was seen"
        assert not away, f"the page reached beyond the server: {away}"
    except (AssertionError, RuntimeError) as e:
        print(f"FAIL: {e}")
        return 1
    finally:
        b.close()
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
