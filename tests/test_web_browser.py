"""The web app in a real headless chromium (Playwright, Debian's /usr/bin/chromium) against a
live server: sign in as the admin, create an org, sign in with its key, see the org home;
XSS stays text; a CSRF-less form post is refused; sign-out ends the session; another org's
guessed thread URL is not found. Screenshots are saved as test artefacts (path printed)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from conftest import LiveServer
from web_helpers import artefacts_dir, chromium  # noqa: F401  (the fixture)

DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 360, "height": 740}
XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2"> & [/]'
DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img"


def _context(browser: Any, base_url: str, viewport: dict[str, int] = DESKTOP) -> Any:
    ctx = browser.new_context(base_url=base_url, viewport=viewport)
    ctx.set_default_timeout(20_000)
    return ctx


def _watch_csp(page: Any, problems: list[str]) -> None:
    """Collect console errors (a CSP violation is reported there) and page errors."""
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))


def _sign_in_with_keyboard(page: Any, key: str) -> None:
    """Reach the key field with Tab only, type the key and press Enter."""
    page.goto("/app/login")
    for _ in range(12):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement && document.activeElement.id") == "key":
            break
    else:
        raise AssertionError("the key field cannot be reached with the keyboard")
    page.keyboard.type(key)
    with page.expect_navigation():
        page.keyboard.press("Enter")


def _shot(page: Any, name: str, *, full_page: bool = True) -> Path:
    path = artefacts_dir() / f"{name}.png"
    # caret="initial": Playwright's caret hiding injects a <style>, which the CSP refuses
    page.screenshot(path=str(path), full_page=full_page, caret="initial")
    return path


def test_admin_creates_an_org_which_signs_in_and_sees_its_home(
    chromium: Any,  # noqa: F811
    module_server: LiveServer,
) -> None:
    server = module_server
    print(f"\nscreenshots: {artefacts_dir().resolve()}")
    problems: list[str] = []
    admin_ctx = _context(chromium, server.url)
    admin = admin_ctx.new_page()
    _watch_csp(admin, problems)
    _sign_in_with_keyboard(admin, server.admin_key)
    assert admin.url.endswith("/app/admin")
    admin.get_by_label("Name").fill("Acme")
    with admin.expect_navigation():
        admin.get_by_role("button", name="Create org").click()
    key = admin.locator("#secret-value").input_value()
    assert key.startswith("an_org_")
    _shot(admin, "admin-orgs")

    # a form post without its CSRF token is refused (the hidden field removed from the page)
    admin.evaluate(
        "document.querySelector('form[action=\"/app/admin/orgs\"] input[name=csrf_token]').remove()"
    )
    admin.get_by_label("Name").fill("Evil Corp")
    with admin.expect_response("**/app/admin/orgs") as posted:
        admin.get_by_role("button", name="Create org").click()
    assert posted.value.status == 403
    assert admin.get_by_role("heading", name="Form refused").is_visible()
    admin_ctx.close()
    with server.client(server.admin_key) as api:
        assert "Evil Corp" not in [o["name"] for o in api.get("/orgs").json()]

    # the org's data, made over the API with the new key: a person, a team, a thread
    with server.client(key) as acme:
        alex = acme.post("/users", json={"name": "Alex Rivera"}).json()
        team = acme.post("/teams", json={"name": "Rollout"}).json()
        acme.post(f"/teams/{team['id']}/members", json={"user_id": alex["id"]})
        thread = acme.post(f"/teams/{team['id']}/threads", json={"title": "rollout-status"}).json()
        for text in ("Canary is at 5%, error rate flat.", XSS, "Moving to 25% at 14:00."):
            r = acme.post(
                f"/threads/{thread['id']}/messages", json={"content": text, "user_id": alex["id"]}
            )
            assert r.status_code == 201, r.text

    shots: dict[str, Path] = {}
    for label, viewport in (("desktop", DESKTOP), ("360px", PHONE)):
        ctx = _context(chromium, server.url, viewport)
        page = ctx.new_page()
        _watch_csp(page, problems)
        _sign_in_with_keyboard(page, key)
        assert page.url.endswith("/app/")
        assert page.get_by_role("heading", name="Acme", exact=True).is_visible()
        assert page.get_by_role("link", name="rollout-status").is_visible()
        shots[f"home-{label}"] = _shot(page, f"org-home-{label}")
        with page.expect_navigation():
            page.get_by_role("link", name="rollout-status").click()
        # the XSS attempt is shown as text and ran nothing
        assert page.get_by_text(XSS, exact=True).is_visible()
        assert page.evaluate("window.__xss") is None
        assert page.locator(".messages img").count() == 0
        shots[f"thread-{label}"] = _shot(page, f"thread-{label}")
        if label == "360px":  # nothing wider than the screen
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"], width
        ctx.close()

    # sign-out ends the session, also for a copy of the cookie
    ctx = _context(chromium, server.url)
    page = ctx.new_page()
    _sign_in_with_keyboard(page, key)
    cookies = ctx.cookies()
    with page.expect_navigation():
        page.get_by_role("button", name="Sign out").click()
    assert page.get_by_text("You are signed out.").is_visible()
    page.goto("/app/")
    assert page.url.endswith("/app/login")
    ctx.close()
    replay = _context(chromium, server.url)
    replay.add_cookies(cookies)
    page = replay.new_page()
    page.goto("/app/")
    assert page.url.endswith("/app/login")
    replay.close()

    # another org's guessed thread URL is the same "not found" page as a missing one
    with server.client(server.admin_key) as api:
        globex_key = api.post("/orgs", json={"name": "Globex"}).json()["secret"]
    ctx = _context(chromium, server.url)
    page = ctx.new_page()
    _sign_in_with_keyboard(page, globex_key)
    guessed = page.goto(f"/app/threads/{thread['id']}")
    assert guessed is not None and guessed.status == 404
    assert page.get_by_role("heading", name="Not found").is_visible()
    assert page.get_by_text("rollout-status").count() == 0
    guessed_text = page.inner_text("main")
    missing = page.goto("/app/threads/thr_000000000000")
    assert missing is not None and missing.status == 404
    assert page.inner_text("main") == guessed_text
    ctx.close()

    assert not [p for p in problems if "Content Security Policy" in p], problems
    assert not [p for p in problems if "Failed to load resource" not in p], problems
    if os.environ.get("AGENT_NETWORK_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shots["thread-desktop"], DOCS_IMG / "webapp-thread-desktop.png")
        shutil.copyfile(shots["home-360px"], DOCS_IMG / "webapp-home-360px.png")


def test_the_api_docs_page_works_offline(
    chromium: Any,  # noqa: F811
    module_server: LiveServer,
) -> None:
    """Swagger UI renders from the packaged assets with every other host unreachable."""
    server = module_server
    ctx = _context(chromium, server.url)
    outside: list[str] = []

    def only_this_server(route: Any) -> None:
        if route.request.url.startswith(server.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    ctx.route("**/*", only_this_server)
    page = ctx.new_page()
    page.goto("/api/v1/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
    assert "Agent Network" in page.inner_text(".swagger-ui .info .title")
    assert page.locator(".opblock").count() > 10
    _shot(page, "api-docs", full_page=False)
    ctx.close()
    assert outside == []
