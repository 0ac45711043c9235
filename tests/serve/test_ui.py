"""The web dashboard at /ui (issue 13 §1) in a real browser: Debian's headless Chromium driven
by Playwright against the running Serve app. Sign-in, each view, a search, an edit, a delete,
a permission denial shown as such, keyboard use and labels; a screenshot of each view goes to
build/ui-screenshots/. Also GET /v1/stats (the request metrics the Plots view draws)."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import expect
from support import bearer, user_with_key

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parents[2] / "build" / "ui-screenshots"
TEA = "Ada drinks green tea every morning"


# ------------------------------------------------------------------ fixtures
@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser() -> AsyncIterator[Any]:
    """One headless Chromium for the session (Debian's package: no browser download)."""
    from playwright.async_api import async_playwright

    if not CHROMIUM.exists():  # noqa: ASYNC240 (once per session)
        pytest.fail("the browser tests need /usr/bin/chromium: apt-get install -y chromium")
    SHOTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        await chromium.close()


@pytest_asyncio.fixture(loop_scope="session")
async def page(browser: Any, ray_serve: dict[str, Any]) -> AsyncIterator[Any]:
    """A fresh browser context (its own session storage); fails the test on a page error or a
    Content-Security-Policy violation."""
    context = await browser.new_context(
        base_url=ray_serve["url"], viewport={"width": 1280, "height": 900}
    )
    tab = await context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

    def console(message: Any) -> None:
        # An API refusal (401/403/404) is logged by Chromium as a failed resource load: that
        # is the app doing its job. Anything else at error level is a bug (CSP included).
        if message.type == "error" and "Failed to load resource" not in message.text:
            problems.append(f"console: {message.text}")

    tab.on("console", console)
    tab.set_default_timeout(20_000)
    yield tab
    await context.close()
    assert problems == []


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def seeded(ray_serve: dict[str, Any], admin_key: str) -> dict[str, Any]:
    """The Admin's memories: one of each type, the quick start's fact (reinforced once), two
    AI models, a session with a recorded turn."""
    tag = uuid.uuid4().hex[:6]
    async with httpx.AsyncClient(
        base_url=ray_serve["url"], timeout=60, headers=bearer(admin_key)
    ) as http:

        async def store(body: dict[str, Any]) -> dict[str, Any]:
            r = await http.post("/v1/users/me/memories", json=body)
            assert r.status_code == 201, r.text
            return r.json()

        llm, sdxl = f"ui-llm-{tag}", f"ui-sdxl-{tag}"
        for name, kind in ((llm, "llm"), (sdxl, "image-generation")):
            r = await http.post("/v1/models", json={"name": name, "kind": kind, "version": "1"})
            assert r.status_code == 201, r.text
        session = f"ui-{tag}"
        conversation = await store(
            {
                "type": "conversation",
                "title": "Trip planning",
                "session_id": session,
                "model": llm,
                "messages": [
                    {"role": "user", "content": "Where should Ada go in spring?"},
                    {"role": "assistant", "content": "Lisbon: mild weather and tea houses."},
                ],
            }
        )
        await store({"type": "fact", "statement": TEA, "confidence": 0.9, "tags": ["qs"]})
        tea = await store({"type": "fact", "statement": TEA, "confidence": 0.9, "tags": ["qs"]})
        assert tea["reinforcement_count"] >= 1  # stored again: reinforced
        trip = await store(
            {
                "type": "fact",
                "statement": "Ada is in Lisbon this week",
                "kind": "ephemeral",
                "confidence": 0.6,
            }
        )
        doomed = await store({"type": "fact", "statement": "Ada owns a red kayak named Bolt"})
        image = await store(
            {
                "type": "image",
                "prompt": "a lighthouse at dusk, oil painting",
                "negative_prompt": "blurry",
                "model": sdxl,
                "seed": 424242,
                "steps": 30,
                "guidance_scale": 7.5,
                "size": {"width": 1024, "height": 768},
                "scheduler": "DPM++ 2M Karras",
                "controlnet": {"model": "canny", "conditioning_scale": 0.8},
                "instantid": {"ip_adapter_scale": 0.7},
            }
        )
        transcription = await store(
            {
                "type": "transcription",
                "language": "fr",
                "duration_seconds": 5.0,
                "segments": [
                    {"start": 0.0, "end": 2.5, "text": "Bonjour tout le monde", "speaker": "A"},
                    {"start": 2.5, "end": 5.0, "text": "On part à Lisbonne", "speaker": "B"},
                ],
            }
        )
        summary = await store(
            {
                "type": "summary",
                "text": "Ada planned a spring trip to Lisbon and likes green tea.",
                "covers": [conversation["id"], tea["id"]],
            }
        )
        r = await http.post(
            f"/v1/users/me/sessions/{session}/turns",
            json={"user_message": "I love green tea", "assistant_message": "Noted!"},
        )
        assert r.status_code == 201, r.text
    return {
        "session": session,
        "llm": llm,
        "conversation": conversation,
        "tea": tea,
        "trip": trip,
        "doomed": doomed,
        "image": image,
        "transcription": transcription,
        "summary": summary,
    }


async def sign_in(page: Any, key: str) -> None:
    await page.goto("/ui")
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name="Sign in").click()
    await page.get_by_role("navigation", name="Views").wait_for()


async def shot(page: Any, name: str) -> None:
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def unlabelled(page: Any) -> list[str]:
    """The visible form controls without an accessible name (a <label> or aria-label)."""
    return await page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea')]
             .filter((el) => el.offsetParent !== null && el.type !== 'hidden')
             .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
             .map((el) => el.outerHTML)"""
    )


# ------------------------------------------------------------------ serving
async def test_the_ui_is_served_offline_with_a_strict_policy(http: httpx.AsyncClient) -> None:
    r = await http.get("/ui")
    assert r.status_code == 308 and r.headers["location"] == "/ui/"
    r = await http.get("/ui/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert "frame-ancestors 'none'" in csp and r.headers["x-content-type-options"] == "nosniff"
    # No CDN: every script and stylesheet the page names is a relative path served here.
    assets = [a for a in re.findall(r'(?:src|href)="([^"#]+)"', r.text) if a != "data:,"]
    assert assets and all(not a.startswith(("http:", "https:", "//")) for a in assets)
    for asset in assets:
        got = await http.get(f"/ui/{asset}")
        assert got.status_code == 200, asset
        assert "content-security-policy" in got.headers
    licence = await http.get("/ui/vendor/uPlot.LICENSE")
    assert licence.status_code == 200 and "MIT" in licence.text
    missing = await http.get("/ui/no-such-file.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    # The static files are outside the API's contract.
    schema = (await http.get("/openapi.json")).json()
    assert not any(p.startswith("/ui") for p in schema["paths"])


# ------------------------------------------------------------------ sign-in
async def test_sign_in_keeps_the_key_out_of_the_url_and_refuses_a_bad_one(
    page: Any, admin_key: str
) -> None:
    await page.goto("/ui")
    await page.get_by_label("API key").fill("hr_not-a-real-key")
    await page.get_by_role("button", name="Sign in").click()
    await page.get_by_role("alert").filter(has_text="refused").wait_for()
    assert await page.evaluate("() => sessionStorage.length") == 0
    await shot(page, "sign-in")
    await sign_in(page, admin_key)
    assert admin_key not in page.url
    stored = await page.evaluate("() => Object.values(sessionStorage)")
    assert stored == [admin_key]
    assert await page.evaluate("() => localStorage.length") == 0
    await page.get_by_role("button", name="Sign out").click()
    await page.get_by_label("API key").wait_for()
    assert await page.evaluate("() => sessionStorage.length") == 0


# ------------------------------------------------------------------ memories
async def test_memories_show_each_type_as_itself(
    page: Any, admin_key: str, seeded: dict[str, Any]
) -> None:
    await sign_in(page, admin_key)
    timeline = page.locator("#timeline")
    tea = timeline.locator(f'[data-memory-id="{seeded["tea"]["id"]}"]')
    await tea.get_by_text(TEA).wait_for()
    count = seeded["tea"]["reinforcement_count"]
    shown = (await tea.inner_text()).replace("\n", "").replace("\t", "")
    assert f"reinforced{count} time{'' if count == 1 else 's'}" in shown
    # Stored at 0.9, then reinforced: the confidence rises.
    assert float(await tea.get_by_label("confidence").get_attribute("value")) > 0.9
    trip = timeline.locator(f'[data-memory-id="{seeded["trip"]["id"]}"]')
    assert "never" not in await trip.locator("dl").inner_text()  # an ephemeral fact expires
    image = timeline.locator(f'[data-memory-id="{seeded["image"]["id"]}"]')
    text = await image.inner_text()
    for expected in (
        "424242",
        "DPM++ 2M Karras",
        "1024 × 768",
        "ControlNet",
        "canny",
        "InstantID",
        "ip_adapter_scale",
        f"model {seeded['llm'].replace('llm', 'sdxl')} 1",
    ):
        assert expected in text, expected
    words = timeline.locator(f'[data-memory-id="{seeded["transcription"]["id"]}"]')
    await words.get_by_role("cell", name="Bonjour tout le monde").wait_for()
    assert "fr" in await words.locator("dl").inner_text()
    conv = timeline.locator(f'[data-memory-id="{seeded["conversation"]["id"]}"]')
    await conv.get_by_role("button", name="Show 2 messages").click()
    await conv.get_by_text("Lisbon: mild weather and tea houses.").wait_for()
    await shot(page, "memories")
    # A summary links the memories it covers.
    summary = timeline.locator(f'[data-memory-id="{seeded["summary"]["id"]}"]')
    await summary.get_by_role("link", name=seeded["conversation"]["id"][:8]).click()
    await page.get_by_role("heading", name="Memory").wait_for()
    assert seeded["conversation"]["id"] in page.url
    await page.get_by_text("Where should Ada go in spring?").wait_for()  # opened with its messages

    # Filtered by type: only facts.
    await page.goto("/ui/#/memories")
    await timeline.locator("article").first.wait_for()
    await page.get_by_label("Type").select_option("fact")
    await page.get_by_role("button", name="Apply").click()
    await expect(timeline.locator("article .badge").filter(has_not_text="fact")).to_have_count(0)
    await timeline.locator("article").first.wait_for()
    badges = await timeline.locator("article .badge").all_inner_texts()
    assert badges and set(badges) == {"fact"}
    # ... and by session.
    await page.get_by_label("Type").select_option("")
    await page.get_by_label("Session").fill(seeded["session"])
    await page.get_by_role("button", name="Apply").click()
    await timeline.locator(f'[data-memory-id="{seeded["conversation"]["id"]}"]').wait_for()
    await expect(timeline.locator(f'[data-memory-id="{seeded["tea"]["id"]}"]')).to_have_count(0)
    sessions = await timeline.locator("article header").all_inner_texts()
    assert sessions and all(f"session {seeded['session']}" in h for h in sessions)
    # ... by AI model, and by tag.
    await page.get_by_label("Session").fill("")
    await page.get_by_label("AI model").select_option(seeded["llm"])
    await page.get_by_label("Include shared").uncheck()  # memories of no model are shared
    await page.get_by_role("button", name="Apply").click()
    await expect(timeline.locator("article")).to_have_count(1)
    assert (
        await timeline.locator("article").get_attribute("data-memory-id")
        == (seeded["conversation"]["id"])
    )
    await page.get_by_label("AI model").select_option("")
    await page.get_by_label("Include shared").check()
    await page.get_by_label("Tags (comma-separated)").fill("qs")
    await page.get_by_role("button", name="Apply").click()
    await expect(timeline.locator("article")).to_have_count(1)
    assert await timeline.locator("article").get_attribute("data-memory-id") == seeded["tea"]["id"]


async def test_load_more_shows_each_memory_once_however_often_it_is_clicked(
    page: Any, ray_serve: dict[str, Any], admin_key: str
) -> None:
    """A second click on "Load more" while the next page is on its way sent the same cursor
    again and showed that page twice (pages of long transcriptions, cut by PAGE_MAX_BYTES,
    take their time)."""
    async with httpx.AsyncClient(base_url=ray_serve["url"], timeout=60) as http:
        _, key = await user_with_key(http, admin_key)
        images = [{"type": "image", "prompt": f"sketch number {i} of a harbour"} for i in range(60)]
        r = await http.post(
            "/v1/users/me/memories/batch", json={"memories": images}, headers=bearer(key)
        )
        assert r.status_code == 201, r.text
    cursors: list[str] = []

    async def slow_next_page(route: Any) -> None:
        if "cursor=" in route.request.url:
            cursors.append(route.request.url)
            await asyncio.sleep(1)
        await route.continue_()

    await page.route(re.compile(r".*/v1/users/me/memories\?.*"), slow_next_page)
    await sign_in(page, key)
    timeline = page.locator("#timeline")
    await expect(timeline.locator("article")).to_have_count(50)
    more = page.get_by_role("button", name="Load more")
    await more.click()
    await more.click()  # the page asked for is still on its way
    await expect(more).to_be_hidden()  # the last page is in
    await page.wait_for_timeout(2000)  # what a second request would have added, it has
    ids = [await a.get_attribute("data-memory-id") for a in await timeline.locator("article").all()]
    assert (len(ids), len(set(ids)), len(cursors)) == (60, 60, 1)
    await expect(page.get_by_text("60 memories", exact=True)).to_be_visible()


async def test_an_edit_and_a_delete_go_through_the_api(
    page: Any, admin_key: str, seeded: dict[str, Any], http: httpx.AsyncClient
) -> None:
    await sign_in(page, admin_key)
    trip = page.locator(f'[data-memory-id="{seeded["trip"]["id"]}"]')
    await trip.get_by_role("button", name="Edit").click()
    await trip.get_by_label("Statement").fill("Ada is in Porto this week")
    await trip.get_by_label("Confidence (0–1)").fill("0.75")
    await trip.get_by_label("Tags (comma-separated)").fill("travel, spring")
    await trip.get_by_role("button", name="Save").click()
    await trip.get_by_text("Saved.").wait_for()
    await trip.get_by_text("Ada is in Porto this week").wait_for()
    r = await http.get(f"/v1/users/me/memories/{seeded['trip']['id']}", headers=bearer(admin_key))
    stored = r.json()
    assert stored["memory"]["statement"] == "Ada is in Porto this week"
    assert stored["memory"]["confidence"] == 0.75 and stored["tags"] == ["travel", "spring"]
    # A value the API refuses is shown, and nothing changes.
    await trip.get_by_role("button", name="Edit").click()
    await trip.get_by_label("Confidence (0–1)").evaluate("el => { el.min = ''; el.max = ''; }")
    await trip.get_by_label("Confidence (0–1)").fill("7")
    await trip.get_by_role("button", name="Save").click()
    await trip.get_by_text("422 invalid_input").wait_for()
    r = await http.get(f"/v1/users/me/memories/{seeded['trip']['id']}", headers=bearer(admin_key))
    assert r.json()["memory"]["confidence"] == 0.75

    doomed = page.locator(f'[data-memory-id="{seeded["doomed"]["id"]}"]')
    await doomed.get_by_role("button", name="Delete").click()
    await doomed.get_by_role("button", name="Confirm delete").click()
    await doomed.get_by_text("Deleted fact").wait_for()
    r = await http.get(f"/v1/users/me/memories/{seeded['doomed']['id']}", headers=bearer(admin_key))
    assert r.status_code == 404


# ------------------------------------------------------------------ search and context
async def test_the_search_playground_explains_each_result(
    page: Any, admin_key: str, seeded: dict[str, Any]
) -> None:
    await sign_in(page, admin_key)
    await page.get_by_role("link", name="Search").click()
    await page.get_by_label("Query").fill("what does Ada drink?")
    await page.get_by_label("Mode", exact=True).select_option("hybrid")
    await page.get_by_role("button", name="Search", exact=True).click()
    results = page.get_by_role("list", name="Results")
    hit = results.locator(f'[data-memory-id="{seeded["tea"]["id"]}"]').first
    await hit.wait_for()
    why = await hit.locator(".why").inner_text()
    assert "found by" in why and "hybrid" in why and "fused" in why
    assert await hit.locator(".matched mark").count() >= 1  # "Ada" / "drink" highlighted
    await shot(page, "search")
    # Semantic with a threshold: the reason names the similarity and the bar it passed.
    await page.get_by_label("Mode", exact=True).select_option("semantic")
    await page.get_by_label("Threshold (−1 to 1)").fill("0.2")
    await page.get_by_role("button", name="Search", exact=True).click()
    await results.locator(".why").first.wait_for()
    first = await results.locator(".why").first.inner_text()
    assert "cosine similarity" in first and "threshold 0.20" in first
    # A bad value comes back as the API's error.
    await page.get_by_label("Threshold (−1 to 1)").evaluate("el => { el.min = ''; el.max = ''; }")
    await page.get_by_label("Threshold (−1 to 1)").fill("3")
    await page.get_by_role("button", name="Search", exact=True).click()
    await results.get_by_text("422 invalid_input").wait_for()


async def test_the_context_preview_shows_sections_tokens_and_sources(
    page: Any, admin_key: str, seeded: dict[str, Any]
) -> None:
    await sign_in(page, admin_key)
    await page.get_by_role("link", name="Context").click()
    await page.get_by_label("Session").fill(seeded["session"])
    await page.get_by_label("User message").fill("What tea does Ada like?")
    await page.get_by_label("Token budget").fill("400")
    await page.get_by_role("button", name="Preview").click()
    out = page.locator("#context-out")
    await out.get_by_text("of 400 tokens").wait_for()
    used = int((await out.get_by_role("status").inner_text()).split()[0])
    assert 0 < used <= 400
    assert await out.locator("section h2").count() >= 1
    assert "tokens" in await out.locator("section h2").first.inner_text()
    prompt = await out.get_by_label("prompt block").inner_text()
    assert "green tea" in prompt
    sources = out.locator("a[href*='#/memories/']")
    assert await sources.count() >= 1
    await shot(page, "context")
    await sources.first.click()
    await page.get_by_role("heading", name="Memory").wait_for()


# ------------------------------------------------------------------ admin and plots
async def test_admin_manages_users_keys_grants_models_and_reads_the_audit_log(
    page: Any, admin_key: str, http: httpx.AsyncClient, seeded: dict[str, Any]
) -> None:
    await sign_in(page, admin_key)
    await page.get_by_role("link", name="Admin").click()
    name = f"uiviewer{uuid.uuid4().hex[:6]}"
    await page.get_by_label("Username").fill(name)
    await page.get_by_label("Role", exact=True).select_option("viewer")
    await page.get_by_role("button", name="Create user").click()
    row = page.get_by_role("row").filter(has_text=name)
    await row.wait_for()
    await shot(page, "admin-users")
    users = (await http.get("/v1/users", params={"limit": 1000}, headers=bearer(admin_key))).json()
    viewer = next(u for u in users["items"] if u["username"] == name)
    assert viewer["role"] == "viewer"

    # A key: created, shown once, works; rotated; revoked.
    await row.get_by_role("link", name="keys").click()
    await page.get_by_label("Key name").fill("laptop")
    await page.get_by_role("button", name="Create key").click()
    key = await page.get_by_label("new API key").inner_text()
    assert (await http.get("/v1/me", headers=bearer(key))).json()["username"] == name
    await shot(page, "admin-keys")
    keyrow = page.get_by_role("row").filter(has_text="laptop")
    await keyrow.get_by_role("button", name="Rotate").click()
    await page.get_by_text("Rotated laptop").wait_for()
    rotated = await page.get_by_label("new API key").inner_text()
    assert rotated != key
    assert (await http.get("/v1/me", headers=bearer(key))).status_code == 401
    assert (await http.get("/v1/me", headers=bearer(rotated))).status_code == 200
    await page.reload()  # the new key is not shown again
    await page.get_by_role("row").filter(has_text="laptop").first.wait_for()
    assert await page.get_by_label("new API key").count() == 0
    live = (
        page.get_by_role("row")
        .filter(has_text="laptop")
        .filter(has=page.get_by_role("button", name="Revoke", disabled=False))
    )
    await live.get_by_role("button", name="Revoke").click()
    await page.get_by_text("Revoked laptop").wait_for()
    assert (await http.get("/v1/me", headers=bearer(rotated))).status_code == 401

    # A viewer grant.
    await page.get_by_role("link", name="Viewer grants").click()
    await page.get_by_label("Viewer", exact=True).select_option(label=name)
    me = (await http.get("/v1/me", headers=bearer(admin_key))).json()
    await page.get_by_label("May read the memories of").select_option(me["id"])
    await page.get_by_role("button", name="Grant").click()
    await page.get_by_text("Granted.").wait_for()
    grants = await http.get(f"/v1/users/{viewer['id']}/grants", headers=bearer(admin_key))
    assert [g["owner_id"] for g in grants.json()["items"]] == [me["id"]]

    # An AI model.
    await page.get_by_role("link", name="AI models").click()
    await page.get_by_role("cell", name=seeded["llm"], exact=True).wait_for()
    model = f"ui-whisper-{uuid.uuid4().hex[:6]}"
    await page.get_by_label("Name").fill(model)
    await page.get_by_label("Kind").select_option("speech")
    await page.get_by_role("button", name="Register").click()
    await page.get_by_role("cell", name=model, exact=True).wait_for()
    assert (await http.get(f"/v1/models/{model}", headers=bearer(admin_key))).status_code == 200

    # The audit log, filtered by action, outcome and request id.
    await page.get_by_role("link", name="Audit log").click()
    await page.get_by_label("Action").fill("key.create")
    await page.get_by_role("button", name="Filter").click()
    rows = page.locator("#audit-rows tbody tr")
    await rows.first.wait_for()
    await expect(rows.locator("td:nth-child(5)").filter(has_not_text="key.create")).to_have_count(0)
    assert set(await rows.locator("td:nth-child(5)").all_inner_texts()) == {"key.create"}
    await shot(page, "admin-audit")
    rid = f"ui-{uuid.uuid4().hex[:8]}"
    nosy, user_key = await user_with_key(http, admin_key)
    refused = await http.get("/v1/audit", headers={**bearer(user_key), "X-Request-ID": rid})
    assert refused.status_code == 403
    await page.get_by_label("Action").fill("")
    await page.get_by_label("Actor (user id)").fill(nosy["id"])
    await page.get_by_label("Outcome").select_option("denied")
    await page.get_by_label("Request id").fill(rid)
    await page.get_by_role("button", name="Filter").click()
    await page.get_by_text("1 row", exact=True).wait_for()
    assert await rows.locator("td:nth-child(7)").all_inner_texts() == ["denied"]


async def test_plots_draw_memories_and_the_service_metrics(
    page: Any, admin_key: str, seeded: dict[str, Any]
) -> None:
    await sign_in(page, admin_key)
    await page.get_by_role("link", name="Plots").click()
    over_time = page.get_by_role("img", name=re.compile("^Memories over time by type"))
    await over_time.locator("canvas").wait_for()
    label = await over_time.get_attribute("aria-label")
    assert re.search(r"fact [1-9]", label) and re.search(r"image [1-9]", label)
    confidence = page.get_by_role("img", name=re.compile("^Facts by confidence"))
    assert await confidence.locator("canvas").count() == 1
    storage = page.get_by_role("table", name="Storage by type")
    fact_row = storage.get_by_role("row").filter(has_text="fact")
    assert int(await fact_row.locator("td").nth(1).inner_text()) >= 2
    rate = page.get_by_role("img", name=re.compile("^Request rate"))
    await rate.locator("canvas").wait_for()
    routes = page.get_by_role("table", name="Requests by route")
    await routes.get_by_role("cell", name="/v1/me", exact=True).wait_for()
    await routes.get_by_role("cell", name="/ui", exact=True).wait_for()  # the page's own files
    await shot(page, "plots")


# ------------------------------------------------------------------ permissions
async def test_a_viewer_is_refused_admin_and_cannot_edit(
    page: Any, admin_key: str, http: httpx.AsyncClient, seeded: dict[str, Any]
) -> None:
    viewer, key = await user_with_key(http, admin_key, role="viewer")
    me = (await http.get("/v1/me", headers=bearer(admin_key))).json()
    r = await http.post(
        f"/v1/users/{viewer['id']}/grants", json={"owner_id": me["id"]}, headers=bearer(admin_key)
    )
    assert r.status_code == 201, r.text
    await sign_in(page, key)
    assert await page.get_by_role("link", name="Admin").is_hidden()
    # The granted owner's memories are readable, with no edit or delete.
    await page.get_by_label("User").select_option(me["id"])
    await page.get_by_role("button", name="Apply").click()
    tea = page.locator(f'[data-memory-id="{seeded["tea"]["id"]}"]')
    await tea.wait_for()
    assert await page.get_by_role("button", name="Edit").count() == 0
    assert await page.get_by_role("button", name="Delete").count() == 0
    # The Admin view, reached by its address: the API's refusal, shown as such.
    await page.goto("/ui/#/admin")
    denied = page.locator(".denied")
    await denied.get_by_text("Permission denied").wait_for()
    assert "viewer" in await denied.inner_text() and "may not" in await denied.inner_text()
    await shot(page, "denied")
    rows = await http.get(
        "/v1/audit",
        params={"user_id": viewer["id"], "outcome": "denied"},
        headers=bearer(admin_key),
    )
    assert any(row["operation"] == "user.list" for row in rows.json()["items"]), rows.text
    # The service's metrics are the Admins'.
    await page.goto("/ui/#/plots")
    await page.locator("#plots-service").get_by_text("Permission denied").wait_for()


async def test_an_address_cannot_send_an_action_to_another_route(
    page: Any, admin_key: str, http: httpx.AsyncClient
) -> None:
    """A value from the location hash goes into a request path encoded, and a path with a dot
    segment is never sent: a link made to move "Create key" onto another route (here: rotate,
    so revoke, a user's key) reaches nothing."""
    victim, key = await user_with_key(http, admin_key)
    key_id = (await http.get(f"/v1/users/{victim['id']}/keys", headers=bearer(admin_key))).json()[
        "items"
    ][0]["id"]
    sent: list[str] = []
    page.on("request", lambda r: sent.append(f"{r.method} {r.url}"))
    await sign_in(page, admin_key)
    await page.goto(f"/ui/#/admin/keys/..%2Fkeys%2F{key_id}%2Frotate%3F")
    await page.get_by_label("Key name").fill("laptop")
    await page.get_by_role("button", name="Create key").click()
    refusal = page.locator("[role=status] .denied")
    await refusal.wait_for()
    assert "not a valid address" in await refusal.inner_text()
    assert not [r for r in sent if "/rotate" in r], sent
    assert (await http.get("/v1/me", headers=bearer(key))).status_code == 200  # not revoked
    keys = (await http.get(f"/v1/users/{victim['id']}/keys", headers=bearer(admin_key))).json()
    assert [k["id"] for k in keys["items"]] == [key_id]
    # A dot segment in a memory's address: refused in the page, nothing sent.
    sent.clear()
    await page.goto("/ui/#/memories/me/..")
    await page.locator(".denied").filter(has_text="not a valid address").wait_for()
    assert not [r for r in sent if r.endswith("/v1/users/me/")], sent
    # An encoded slash or a backslash (the server reads %2F as "/", URLs read "\\" as "/").
    for address in (f"{key_id}%2Fhistory", f"{key_id}%5Chistory", "%2E%2E"):
        sent.clear()
        await page.goto("/ui/#/memories/me/x")
        await page.goto(f"/ui/#/memories/me/{address}")
        await page.locator(".denied").filter(has_text="not a valid address").wait_for()
        assert not [r for r in sent if "history" in r or r.endswith("/v1/users/me/")], sent


# ------------------------------------------------------------------ keyboard and labels
async def test_keyboard_only_use_and_labelled_controls(
    page: Any, admin_key: str, seeded: dict[str, Any]
) -> None:
    await page.goto("/ui")
    key_field = page.get_by_label("API key")
    await expect(key_field).to_be_focused()  # the sign-in page starts in the key field
    await page.keyboard.press("Shift+Tab")  # the skip link comes first in the tab order
    assert await page.evaluate("() => document.activeElement.textContent") == "Skip to content"
    await page.keyboard.press("Tab")
    await expect(key_field).to_be_focused()
    await page.keyboard.type(admin_key)
    await page.keyboard.press("Enter")
    await page.get_by_role("navigation", name="Views").wait_for()
    await expect(page.locator("#main")).to_be_focused()  # signed in: focus on the content
    await page.locator("#timeline article").first.wait_for()
    for view, heading in (
        ("Memories", "Memories"),
        ("Search", "Search playground"),
        ("Context", "Context preview"),
        ("Admin", "Admin"),
        ("Plots", "Plots"),
    ):
        await page.get_by_role("link", name="Skip to content").focus()
        for _ in range(12):
            await page.keyboard.press("Tab")
            if await page.evaluate("() => document.activeElement.textContent") == view:
                break
        else:
            raise AssertionError(f"Tab never reached the {view} link")
        await page.keyboard.press("Enter")
        await page.get_by_role("heading", name=heading, exact=True).wait_for()
        assert await page.locator("#nav a[aria-current='page']").inner_text() == view
        assert await unlabelled(page) == [], view
    # Each Admin section's controls are labelled too.
    for section in ("users", "keys", "grants", "models", "audit"):
        await page.goto(f"/ui/#/admin/{section}")
        await page.locator("#view section form, #view section .notice").first.wait_for()
        assert await unlabelled(page) == [], section
    # A search by keyboard alone.
    await page.goto("/ui/#/search")
    await page.get_by_label("Query").focus()
    await page.keyboard.type("green tea")
    await page.keyboard.press("Enter")
    await page.get_by_role("list", name="Results").locator("article").first.wait_for()


# ------------------------------------------------------------------ GET /v1/stats
async def test_stats_are_for_admins_and_count_requests(
    http: httpx.AsyncClient, admin_key: str
) -> None:
    for _ in range(3):
        assert (await http.get("/v1/me", headers=bearer(admin_key))).status_code == 200
    r = await http.get("/v1/stats", headers=bearer(admin_key))
    assert r.status_code == 200, r.text
    stats = r.json()
    me = next(x for x in stats["routes"] if x["route"] == "/v1/me" and x["method"] == "GET")
    assert me["requests"] >= 3 and me["mean_ms"] > 0 and me["p95_ms"] >= me["p50_ms"] > 0
    # Each window names its slowest request (no trace id: tracing is off in this app).
    assert me["slowest"]["ms"] == me["max_ms"] and me["slowest"]["request_id"]
    assert me["slowest"]["trace_id"] is None
    assert stats["window_minutes"] == 60 and sum(m["requests"] for m in stats["minutes"]) >= 3
    again = (await http.get("/v1/stats", headers=bearer(admin_key))).json()
    me2 = next(x for x in again["routes"] if x["route"] == "/v1/me" and x["method"] == "GET")
    assert me2["requests"] == me["requests"]  # counted per route: /v1/stats is its own
    _, user_key = await user_with_key(http, admin_key)
    refused = await http.get("/v1/stats", headers=bearer(user_key))
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"
    assert (await http.get("/v1/stats")).status_code == 401
    audit = await http.get(
        "/v1/audit",
        params={"operation": "service.stats", "outcome": "denied"},
        headers=bearer(admin_key),
    )
    assert audit.json()["items"], audit.text


# ------------------------------------------------------------------ hostile stored text
HOSTILE = (
    '<script>window.__x=1</script> <img src=x onerror="window.__x=1"> '
    '"><svg onload="window.__x=1"> {{7*7}} ${7*7} javascript:window.__x=1'
)
#: What stored text must never do to the page: run a script, become elements, a clickable
#: javascript: link, or widen the page past the screen (an unbroken run of characters).
HARM = """() => {
  const found = [];
  if (window.__x !== undefined) found.push('a stored script ran');
  const view = document.getElementById('view');
  const tags = ['script', 'img', 'svg', 'iframe', '[onerror]', '[onload]'];
  for (const sel of [...tags, 'a[href^="javascript:" i]']) {
    if (view.querySelector(sel)) found.push(`stored text became ${sel}`);
  }
  const page = document.documentElement;
  if (page.scrollWidth > page.clientWidth + 1) {
    const wide = [...view.querySelectorAll('*')]
      .filter((e) => e.getBoundingClientRect().right > page.clientWidth + 1)
      .map((e) => e.tagName + (e.id ? `#${e.id}` : ''));
    found.push(`the page is ${page.scrollWidth}px wide: ${wide.slice(-1)}`);
  }
  return found;
}"""


async def test_hostile_stored_text_is_shown_as_text_and_fits_the_page(
    page: Any, ray_serve: dict[str, Any], admin_key: str
) -> None:
    """Markup, script, javascript: URLs, template syntax, unbroken 3000-character runs and a
    10,000-line text, stored through the API, come back in every view as text that wraps: a
    run of one letter or a 200-character model name in a <select> made the page tens of
    thousands of pixels wide. A model whose name holds a "/" can be deleted (it was refused
    as an unsafe path), and a malformed escape in the address (%E0%A4%A) is an answer, not
    an uncaught URIError that left the previous view on screen."""
    long = "W" * 3000
    tag = uuid.uuid4().hex[:6]
    async with httpx.AsyncClient(base_url=ray_serve["url"], timeout=60) as http:
        _, key = await user_with_key(http, admin_key, role="admin")
        auth = bearer(key)

        async def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
            r = await http.post(path, json=body, headers=auth)
            assert r.status_code == 201, r.text
            return r.json()

        for name in (f"{HOSTILE[:150]} {tag}", f"org/slash-{tag}", f"{'L' * 190}{tag}"):
            await post("/v1/models", {"name": name, "kind": "llm", "version": HOSTILE[:100]})
        await post("/v1/users", {"username": f"x{tag}", "email": f'"><svg/onload=x>{tag}@x.io'})
        await post("/v1/users/me/keys", {"name": HOSTILE[:100]})
        stored = {}
        for name, body in {
            "conversation": {
                "type": "conversation",
                "title": HOSTILE,
                "session_id": f"s{tag}",
                "tags": ["javascript:x", "T" * 60],
                "messages": [
                    {"role": "user", "name": HOSTILE[:60], "content": f"{HOSTILE} window {long}"},
                    {"role": "assistant", "name": "N" * 150, "content": "zero\u200bwidth"},
                ],
            },
            "fact": {
                "type": "fact",
                "statement": f"{HOSTILE} window {long[:1500]}",
                "source": "javascript:window.__x=1",
            },
            "image": {
                "type": "image",
                "prompt": f"{HOSTILE} window {long}",
                "uri": "javascript:window.__x=1",
                "generator": HOSTILE[:60],
                "negative_prompt": HOSTILE,
                "controlnet": {HOSTILE: HOSTILE + long, "Q" * 1000: 1},
            },
            "transcription": {
                "type": "transcription",
                "audio_uri": "javascript:window.__x=1",
                "segments": [
                    {"start": 0, "end": 1, "speaker": HOSTILE[:60], "text": f"{HOSTILE} {long}"}
                ],
            },
            "summary": {
                "type": "summary",
                "text": f"{HOSTILE} window {long}\n"
                + "\n".join(f"line {i}" for i in range(10_000)),
            },
        }.items():
            stored[name] = await post("/v1/users/me/memories", body)
        await post(
            f"/v1/users/me/sessions/s{tag}/turns",
            {"user_message": f"{HOSTILE} window", "assistant_message": HOSTILE + long},
        )

    await sign_in(page, key)

    async def harmless(where: str) -> None:
        await page.wait_for_timeout(300)  # let the last answers render
        assert await page.evaluate(HARM) == [], where

    await page.locator("#timeline article").first.wait_for()
    # ... and the conversation the recorded turn went into.
    await expect(page.locator("#timeline article")).to_have_count(len(stored) + 1)
    await harmless("memories")
    for name, memory in stored.items():
        await page.goto(f"/ui/#/memories/me/{memory['id']}")
        await page.locator(f'article[data-memory-id="{memory["id"]}"]').wait_for()
        await harmless(f"memory {name}")
    # The markup is there as text, word for word.
    await page.goto(f"/ui/#/memories/me/{stored['fact']['id']}")
    await page.get_by_text("javascript:window.__x=1", exact=True).wait_for()
    assert HOSTILE in await page.locator("article.card p").first.inner_text()

    await page.goto("/ui/#/search")
    await page.get_by_label("Query").fill("window")
    await page.get_by_role("button", name="Search").click()
    await page.locator("#results > li").first.wait_for()
    await harmless("search")
    await page.goto("/ui/#/context")
    await page.get_by_label("Session").fill(f"s{tag}")
    await page.get_by_label("User message").fill("window")
    await page.get_by_role("button", name="Preview").click()
    await page.get_by_label("prompt block").wait_for()
    await harmless("context")
    for tab in ("users", "keys", "grants", "models", "audit"):
        await page.goto(f"/ui/#/admin/{tab}")
        await page.locator("#view section h2").wait_for()
        await page.locator("#view section table, #view section .notice").first.wait_for()
        await harmless(f"admin {tab}")
    await page.goto("/ui/#/plots")
    await page.get_by_role("table", name="Requests by route").wait_for()
    await harmless("plots")

    # A model named with a "/" is deleted (by id: its name cannot be a path segment).
    await page.goto("/ui/#/admin/models")
    row = page.locator("tr", has_text=f"org/slash-{tag}")
    await row.get_by_role("button", name="Delete").click()
    await page.get_by_text(f"Deleted org/slash-{tag}.").wait_for()
    await expect(row).to_have_count(0)

    # A malformed escape in the address: the view says what the API answered.
    await page.goto("/ui/#/memories/me/%E0%A4%A")
    await page.get_by_role("heading", name="Memory").wait_for()
    await expect(page.locator("#view .denied")).to_contain_text("422 invalid_input")
    assert await page.evaluate("window.__x") is None
