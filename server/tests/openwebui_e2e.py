#!/usr/bin/env python3
"""OpenWebUI end-to-end check: a real headless Chromium chats with purehw through OpenWebUI.

What it checks: the OpenWebUI page loads, its first-run dialogs can be dismissed,
the model (default gemma3-270m, served by purehw) is selected, a message typed
into the chat input is sent, and an assistant reply with non-empty text finishes
rendering ("Response complete" / action buttons shown, text no longer changing)
and is saved by OpenWebUI without an error. Prints the reply and exits 0;
otherwise prints what the page showed, saves a screenshot and exits 1.

Needs: `pip install playwright` (no `playwright install`: it uses a system
Chromium, e.g. Debian's `apt-get install -y chromium` -> /usr/lib/chromium/chromium).

How it was run (Debian 12, open-webui 0.12.4, playwright 1.65.2, Chromium 156):

    cargo build --release -p purehw-server
    target/release/purehw serve --port 18006 > purehw.log 2>&1 &

    python3 -m venv /work/owui-venv
    nice -n 19 /work/owui-venv/bin/pip install open-webui playwright
    env DATA_DIR=/work/owui-data WEBUI_AUTH=False \\
        WEBUI_SECRET_KEY=e2e-test-secret-key-not-for-production \\
        ENABLE_OLLAMA_API=False ENABLE_OPENAI_API=True \\
        OPENAI_API_BASE_URL=http://127.0.0.1:18006/v1 OPENAI_API_KEY=none \\
        DEFAULT_MODELS=gemma3-270m TASK_MODEL_PARAMS='{"max_tokens":64}' \\
        OFFLINE_MODE=True HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAG_EMBEDDING_ENGINE=openai \\
        RAG_EMBEDDING_MODEL_AUTO_UPDATE=False RAG_RERANKING_MODEL_AUTO_UPDATE=False \\
        ENABLE_VERSION_UPDATE_CHECK=False ANONYMIZED_TELEMETRY=False \\
        SCARF_NO_ANALYTICS=true DO_NOT_TRACK=true \\
        /work/owui-venv/bin/open-webui serve --host 127.0.0.1 --port 18080 > owui.log 2>&1 &
    # wait until `curl -s 127.0.0.1:18080/health` answers 200 (about 1-2 min)

    /work/owui-venv/bin/python server/tests/openwebui_e2e.py \\
        --webui http://127.0.0.1:18080 --chromium /usr/lib/chromium/chromium \\
        --screenshot /work/owui-chat.png

(RAG_EMBEDDING_ENGINE=openai stops OpenWebUI loading a sentence-transformers
model from the hub at startup; OFFLINE_MODE=True skips its other downloads.
The pretrained model seldom stops by itself (uncapped, a reply ran ~3900 tokens,
6 min here), so the script sets the user's Max Tokens (--max-tokens, default 64)
and TASK_MODEL_PARAMS caps the title/tags/follow-up requests; OpenWebUI reads
that env only when it seeds a fresh DATA_DIR.)
"""

import argparse
import re
import sys
import time

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import sync_playwright

# Buttons of first-run dialogs (changelog, onboarding).
DISMISS_BUTTONS = ["Okay, Let's Go!", "Get started", "Skip", "Close"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--webui", default="http://127.0.0.1:18080", help="OpenWebUI base URL")
    p.add_argument("--chromium", default="/usr/lib/chromium/chromium", help="Chromium binary")
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--message", default="Say hello in one short sentence.")
    p.add_argument("--max-tokens", type=int, default=64,
                   help="user default Max Tokens set in OpenWebUI first (0: leave as is); "
                        "the pretrained model rambles for minutes otherwise")
    p.add_argument("--timeout", type=float, default=300, help="seconds for the whole chat")
    p.add_argument("--settle", type=float, default=8,
                   help="seconds to stay after the reply (title/tags/follow-up requests)")
    p.add_argument("--screenshot", default="openwebui_e2e.png", help="PNG written on exit")
    p.add_argument("--headed", action="store_true", help="show the browser (debug)")
    return p.parse_args()


def dismiss_dialogs(page, seconds):
    """Click away first-run dialogs until the chat input is usable."""
    end = time.time() + seconds
    while time.time() < end:
        clicked = False
        for name in DISMISS_BUTTONS:
            btn = page.get_by_role("button", name=name, exact=True)
            try:
                if btn.count() and btn.first.is_visible():
                    btn.first.click(timeout=2000)
                    clicked = True
            except PlaywrightError:
                pass
        inp = page.locator("#chat-input")
        if not clicked and inp.count() and inp.first.is_visible():
            # Nothing modal left covering the input?
            if page.locator("div[role=dialog], .modal").filter(has_text=re.compile(".")).count() == 0:
                return
            try:
                page.keyboard.press("Escape")
            except PlaywrightError:
                pass
        time.sleep(0.5)
    raise RuntimeError("chat input not usable (dialogs still open?)")


def ensure_model(page, model):
    """Select the model in the model selector if it is not already chosen."""
    sel = page.locator("#model-selector-model-button").first
    sel.wait_for(state="visible", timeout=20000)
    if model in sel.inner_text():
        print(f"model {model} already selected")
        return
    print(f"selecting model {model}")
    sel.click()
    search = page.get_by_placeholder(re.compile("Search", re.I)).first
    try:
        search.fill(model, timeout=3000)
    except PlaywrightError:
        pass
    page.get_by_role("button", name=re.compile(re.escape(model))).first.click(timeout=10000)
    page.wait_for_timeout(500)
    if model not in page.locator("#model-selector-model-button").first.inner_text():
        raise RuntimeError(f"could not select model {model}")


def set_max_tokens(page, n):
    """Set Settings > Advanced Params > Max Tokens through OpenWebUI's own API."""
    status = page.evaluate(
        """async (n) => {
            const h = {'Content-Type': 'application/json',
                       Authorization: `Bearer ${localStorage.token}`};
            const s = (await (await fetch('/api/v1/users/user/settings', {headers: h})).json()) || {};
            const ui = s.ui || {};
            ui.params = {...(ui.params || {}), max_tokens: n};
            const r = await fetch('/api/v1/users/user/settings/update',
                                  {method: 'POST', headers: h, body: JSON.stringify({...s, ui})});
            return r.status;
        }""",
        n,
    )
    if status != 200:
        raise RuntimeError(f"settings update answered {status}")
    page.reload(wait_until="domcontentloaded")  # reload so the UI picks it up
    page.locator("#chat-input").first.wait_for(state="attached", timeout=60000)


def send_message(page, text):
    inp = page.locator("#chat-input").first
    inp.click()
    page.keyboard.type(text)
    page.wait_for_timeout(300)
    btn = page.locator("#send-message-button").first
    btn.wait_for(state="visible", timeout=10000)
    btn.click()


def wait_reply(page, deadline):
    """Wait for a finished, non-empty assistant reply; return its text.

    Finished = OpenWebUI's live status says "Response complete" (or the reply's
    action buttons are shown) and the text no longer changes. The Stop button
    is no signal: it stays while title/tags/follow-ups are still generated.
    """
    reply = page.locator("#response-content-container").last
    complete = page.get_by_text("Response complete", exact=True)
    actions = page.get_by_role("button", name=re.compile(r"^(Regenerate|Copy)$"))
    last, stable_since = None, time.time()
    while time.time() < deadline:
        text = reply.inner_text().strip() if reply.count() else ""
        done = complete.count() > 0 or (actions.count() > 0 and actions.last.is_visible())
        if text != last:
            last, stable_since = text, time.time()
        elif text and done and time.time() - stable_since >= 1.0:
            return text
        time.sleep(0.25)
    raise TimeoutError(f"no finished reply in time (last text {last!r})")


def check_saved_reply(page):
    """Read the chat back from OpenWebUI's API: the last assistant message must be
    done, without error, with content (an error box also renders as text)."""
    m = re.search(r"/c/([0-9a-f-]+)", page.url)
    if not m:
        raise RuntimeError(f"no chat id in URL {page.url}")
    msg = page.evaluate(
        """async (id) => {
            const r = await fetch(`/api/v1/chats/${id}`,
                {headers: {Authorization: `Bearer ${localStorage.token}`}});
            const c = await r.json();
            const h = c.chat.history;
            const last = h.messages[h.currentId];
            return {role: last.role, done: last.done, error: last.error ?? null,
                    content: last.content, model: last.model};
        }""",
        m.group(1),
    )
    if msg["role"] != "assistant" or msg["error"] or not (msg["content"] or "").strip():
        raise RuntimeError(f"bad saved reply: {msg!r}")
    return msg


def main():
    args = parse_args()
    t0 = time.time()
    deadline = t0 + args.timeout
    console = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=args.chromium,
            headless=not args.headed,
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(30000)
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
        rc = 1
        try:
            page.goto(args.webui, wait_until="domcontentloaded")
            page.locator("#chat-input").first.wait_for(state="attached", timeout=60000)
            dismiss_dialogs(page, 30)
            if args.max_tokens > 0:
                set_max_tokens(page, args.max_tokens)
                dismiss_dialogs(page, 30)
            ensure_model(page, args.model)
            t_send = time.time()
            send_message(page, args.message)
            # The user's message should show up in the chat.
            page.get_by_text(args.message, exact=True).last.wait_for(timeout=15000)
            text = wait_reply(page, deadline)
            t_reply = time.time()
            saved = check_saved_reply(page)
            print(f"saved message: model={saved['model']} done={saved['done']} "
                  f"chars={len(saved['content'])}")
            print(f"REPLY: {text}")
            print(f"reply finished {t_reply - t_send:.1f}s after send "
                  f"({t_reply - t0:.1f}s total)")
            page.wait_for_timeout(int(args.settle * 1000))
            rc = 0
        except Exception as e:  # noqa: BLE001 - report anything as a failure
            print(f"FAIL: {type(e).__name__}: {e}", file=sys.stderr)
            try:
                body = page.locator("body").inner_text()
                print("--- page text ---\n" + body[-3000:], file=sys.stderr)
            except PlaywrightError:
                pass
            print("--- console (last 20) ---\n" + "\n".join(console[-20:]), file=sys.stderr)
        finally:
            try:
                page.screenshot(path=args.screenshot, full_page=True)
                print(f"screenshot: {args.screenshot}", file=sys.stderr)
            except PlaywrightError as e:
                print(f"screenshot failed: {e}", file=sys.stderr)
            browser.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
