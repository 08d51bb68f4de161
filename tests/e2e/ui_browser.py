"""The dashboard in a real browser: headless Chromium (Debian `chromium`) driven by Playwright.

Started by tests/e2e/ui.rs, which runs latchkey in-process and passes everything through the
environment. The agent is curl through the proxy. Every step asserts what the page shows,
what the agent got, and (in the Rust test afterwards) what the audit log holds. A screenshot
of each page goes to $SHOTS.
"""

import http.server
import json
import os
import subprocess
import sys
import threading

from playwright.sync_api import expect, sync_playwright

UI = os.environ["UI"]  # http://127.0.0.1:PORT
ADMIN_TOKEN = os.environ["ADMIN_TOKEN"]
PROXY = os.environ["PROXY"]  # 127.0.0.1:PORT
CA = os.environ["CA"]
API = os.environ["API"]  # https://api.example.test:PORT
TOKEN = os.environ["TOKEN"]
JTI = os.environ["JTI"]
TOKEN2 = os.environ["TOKEN2"]
JTI2 = os.environ["JTI2"]
SECRET = os.environ["SECRET"]
SHOTS = os.environ["SHOTS"]
NEVER = [SECRET, TOKEN, TOKEN2, ADMIN_TOKEN, "agent-sent-credential"]

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def agent(token, method, path, body=None):
    """curl as the agent, in the background; .communicate() gives (body, status)."""
    args = ["curl", "-sS", "--noproxy", "", "--max-time", "60",
            "--proxy", f"http://agent:{token}@{PROXY}", "--cacert", CA,
            "-o", "-", "-w", "\n%{http_code} %{http_connect}", "-X", method,
            "-H", "authorization: Bearer agent-sent-credential"]
    if body is not None:
        args += ["-H", "content-type: application/json", "--data-binary", body]
    args.append(API + path)
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(proc):
    out, err = proc.communicate(timeout=90)
    body, _, codes = out.rpartition("\n")
    code, _, connect = codes.partition(" ")
    # A refused CONNECT has no final status: its own (e.g. 407) is what the agent got.
    status = int(code or 0) or int(connect or 0)
    return status, body, err


def no_secret(page, what):
    html = page.content()
    for s in NEVER:
        assert s not in html, f"{what} renders a secret or token"


def shot(page, name):
    page.screenshot(path=os.path.join(SHOTS, name), full_page=True)


def attacker_site(target):
    """A page on another origin whose script posts a revoke form to the dashboard."""
    html = f"""<!doctype html><html><body>
<form id="f" method="post" action="{target}">
<input type="hidden" name="jti" value="{JTI2}"><input type="hidden" name="csrf" value="guess">
</form><script>document.getElementById('f').submit();</script></body></html>"""

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            b = html.encode()
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(b)))
            self.end_headers()
            self.wfile.write(b)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def main():
    os.makedirs(SHOTS, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        ctx = browser.new_context(viewport={"width": 1360, "height": 900})
        page = ctx.new_page()

        # Sign in: a wrong token is refused, the right one lands on the approvals page.
        page.goto(UI + "/ui/")
        expect(page).to_have_url(UI + "/ui/login")
        shot(page, "login.png")
        page.fill("#token", "lka_wrong")
        page.click("#signin")
        expect(page.locator("#error")).to_contain_text("wrong admin token")
        page.fill("#token", ADMIN_TOKEN)
        page.fill("#name", "carol")
        responses = []
        page.on("response", lambda r: responses.append(r))
        page.click("#signin")
        expect(page).to_have_url(UI + "/ui/approvals")
        expect(page.locator("header .me")).to_contain_text("carol")
        login_resp = next(r for r in responses if r.url.endswith("/ui/login") and r.request.method == "POST")
        cookie = login_resp.all_headers().get("set-cookie", "")
        assert "lk_ui=" in cookie, cookie
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui/" in cookie, cookie
        csp = page.request.get(UI + "/ui/approvals").headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp, csp

        # The live tail shows an agent's request as it happens, and filters.
        page.goto(UI + "/ui/tail")
        expect(page.locator("#tail-state")).to_have_text("live")
        status, _, err = result(agent(TOKEN, "GET", "/repos/acme/backend/issues"))
        assert status == 200, err
        row = page.locator("#tail tr", has_text="/repos/acme/backend/issues")
        expect(row.first).to_be_visible(timeout=10000)
        expect(row.first).to_contain_text("allow")
        status, _, _ = result(agent(TOKEN, "GET", "/admin/secret-place"))
        assert status == 403
        expect(page.locator("#tail tr", has_text="/admin/secret-place").first).to_be_visible(timeout=10000)
        shot(page, "tail.png")
        page.select_option("#f-decision", "deny")
        expect(page.locator("#tail tr", has_text="/admin/secret-place").first).to_be_visible(timeout=10000)
        expect(page.locator("#tail tr", has_text="/repos/acme/backend/issues")).to_have_count(0)
        shot(page, "tail-filtered.png")
        page.select_option("#f-decision", "")
        no_secret(page, "the live tail")

        # Approve a held request: the agent's call completes.
        held = agent(TOKEN, "POST", "/pay/invoices?id=7", '{"amount":42,"to":"acme"}')
        page.goto(UI + "/ui/approvals")
        card = page.locator("section[data-approval]").first
        expect(card).to_be_visible(timeout=15000)
        expect(card).to_contain_text("POST api.example.test")
        expect(card).to_contain_text('{"amount":42,"to":"acme"}')
        expect(card).to_contain_text("[redacted]")
        no_secret(page, "the approvals page")
        shot(page, "approvals.png")
        card.locator("button.approve").click()
        expect(page.locator("#notice")).to_contain_text("approved")
        status, body, err = result(held)
        assert status == 200, (status, body, err)
        assert json.loads(body)["path"] == "/pay/invoices", body

        # Deny one with a reason: the agent gets 403 approval_denied.
        held = agent(TOKEN, "POST", "/pay/refund", '{"amount":1000000}')
        page.goto(UI + "/ui/approvals")
        card = page.locator("section[data-approval]").first
        expect(card).to_be_visible(timeout=15000)
        card.locator("input[name=reason]").fill("too large")
        card.locator("button.danger").click()
        expect(page.locator("#notice")).to_contain_text("denied")
        status, body, _ = result(held)
        assert status == 403, (status, body)
        v = json.loads(body)
        assert v["reason"] == "approval_denied" and "carol denied this request: too large" == v["detail"], v
        expect(page.locator("#history")).to_contain_text("approval_denied")
        expect(page.locator("#history")).to_contain_text("carol")
        shot(page, "approvals-history.png")

        # Agents and routes, with explain.
        page.goto(UI + "/ui/agents")
        page.fill("#x-method", "POST")
        page.fill("#x-url", API + "/pay/x")
        page.click("#explain button")
        expect(page.locator("#explained")).to_contain_text("allow: route payments")
        expect(page.locator("#explained")).to_contain_text("held for approval")
        shot(page, "agents.png")

        # A forged cross-site POST is refused: another origin's page posting a revoke form
        # (no cookie goes with it: SameSite=Strict), and a post carrying the cookie but an
        # evil Origin or no CSRF token.
        evil = attacker_site(UI + "/ui/sessions/revoke")
        attacker = ctx.new_page()
        attacker.goto(f"http://localhost:{evil.server_address[1]}/")
        expect(attacker.locator("body")).to_contain_text("sign in first", timeout=10000)
        attacker.close()
        r = page.request.post(UI + "/ui/sessions/revoke", form={"jti": JTI2, "csrf": "x"},
                              headers={"Origin": "http://evil.example"})
        assert r.status == 403 and "cross-site" in r.text(), (r.status, r.text())
        r = page.request.post(UI + "/ui/sessions/revoke", form={"jti": JTI2})
        assert r.status == 403 and "CSRF" in r.text(), (r.status, r.text())
        status, _, _ = result(agent(TOKEN2, "GET", "/repos/acme/backend/issues"))
        assert status == 200, "the forged posts revoked nothing"

        # Revoke a session: the agent's next request fails.
        page.goto(UI + "/ui/sessions")
        row = page.locator(f"tr[data-session='{JTI}']")
        expect(row).to_be_visible()
        expect(page.locator(f"tr[data-session='{JTI2}']")).to_be_visible()
        no_secret(page, "the sessions page")
        shot(page, "sessions.png")
        row.locator("button.danger").click()
        expect(page.locator("#notice")).to_contain_text("revoked session " + JTI)
        expect(page.locator(f"tr[data-session='{JTI}']")).to_have_count(0)
        status, body, _ = result(agent(TOKEN, "GET", "/repos/acme/backend/issues"))
        assert status in (403, 407), (status, body)

        # Sign out: the cookie no longer opens anything.
        page.goto(UI + "/ui/approvals")
        page.click("header .logout button")
        expect(page).to_have_url(UI + "/ui/login")
        page.goto(UI + "/ui/sessions")
        expect(page).to_have_url(UI + "/ui/login")
        browser.close()
        evil.shutdown()
    print("browser tests passed")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # one clear line for the Rust side, then the trace
        print(f"FAILED: {e!r}", file=sys.stderr)
        raise
