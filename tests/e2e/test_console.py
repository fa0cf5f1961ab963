"""The web console (/console) in a real browser: Debian's Chromium, headless, driven by
Playwright against a real `prefix-server serve` process on the tiny llama.

Every test shares one server and one browser page and watches it throughout: a dialog (an
injected script that ran), a console error (a Content-Security-Policy violation shows up there)
and every request's URL are collected and checked. Screenshots of each page go to the test's
temporary folder; with UPDATE_CONSOLE_IMAGES=1 the playground's also to docs/images/.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.reliability.common import ADMIN, Live, bearer, build_world, live_server

CHROMIUM = Path("/usr/bin/chromium")
HOSTILE = "<img src=x onerror=alert(1)>"
IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"


@dataclass
class Console:
    live: Live
    page: Page
    shots: Path
    adapters: dict[str, Path]
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)  # keys the console issued

    @property
    def key(self) -> str:
        return self.live.keys["alice"]

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def upload(live: Live, tenant: str, name: str, folder: Path, **fields: str) -> None:
    files = [("files", (p.name, p.read_bytes())) for p in folder.iterdir() if p.suffix != ".md"]
    response = httpx.post(
        f"{live.url}/v1/prefixes",
        data={"name": name, **fields},
        files=files,
        headers=bearer(live.keys[tenant]),
        timeout=60,
    )
    assert response.status_code == 201, response.text


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    if not CHROMIUM.is_file():  # CI installs it (.ci/run): a missing browser fails, never skips
        pytest.fail(f"{CHROMIUM} not found: apt-get install chromium", pytrace=False)
    root = tmp_path_factory.mktemp("console")
    world = build_world(root)
    with live_server(world, root / "server.log") as live:
        # alice: `pirate` (private) and a public one with a hostile description; bob: `poet`
        # (private, never shown to alice) and `bard` (public, shown to alice without delete).
        upload(live, "alice", "shanty", world.adapters["poet"], visibility="public",
               description=HOSTILE)  # fmt: skip
        upload(live, "bob", "bard", world.adapters["poet"], visibility="public")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=["--no-sandbox"]
            )
            page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
            shots = root / "screenshots"
            shots.mkdir()
            state = Console(live, page, shots, world.adapters)

            def dialog(d):  # type: ignore[no-untyped-def]
                state.dialogs.append(d.message)
                d.dismiss()

            page.on("dialog", dialog)
            page.on("console", lambda m: m.type == "error" and state.errors.append(m.text))
            page.on("pageerror", lambda e: state.errors.append(str(e)))
            page.on("request", lambda r: state.urls.append(r.url))
            yield state
            browser.close()


def test_console_files_carry_a_strict_policy(console: Console) -> None:
    url = console.live.url
    assert httpx.get(f"{url}/console").headers["location"].endswith("/console/")
    for path in ("/console/", "/console/app.js", "/console/console.css"):
        response = httpx.get(f"{url}{path}")
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "script-src 'self'" in policy
        assert "unsafe-inline" not in policy
        assert response.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(f"{url}/console/app.js").headers["content-type"].startswith("text/javascript")
    for path in ("/console/missing.js", "/console/..%2Fapi%2Fapp.py", "/console/__init__.py"):
        assert httpx.get(f"{url}{path}").status_code == 404, path
    html = httpx.get(f"{url}/console/").text
    assert "<script>" not in html and "style=" not in html  # nothing inline for the policy to allow


def test_a_wrong_key_is_refused(console: Console) -> None:
    page = console.page
    page.goto(f"{console.live.url}/console")
    page.fill("#api-key", "not-a-key")
    page.click("#sign-in-form button")
    expect(page.locator("#sign-in-error")).to_have_text("That key was refused.")
    assert page.evaluate("sessionStorage.length") == 0


def test_sign_in_lists_own_and_public_prefixes(console: Console) -> None:
    page = console.page
    page.fill("#api-key", console.key)
    page.click("#sign-in-form button")
    rows = page.locator("#prefix-table tbody tr")
    expect(rows).to_have_count(3)
    ids = sorted(rows.evaluate_all("rows => rows.map(r => r.dataset.prefix)"))
    assert ids == ["alice/pirate", "alice/shanty", "bob/bard"]  # never bob's private poet
    pirate = page.locator('tr[data-prefix="alice/pirate"] td')
    assert pirate.all_inner_texts()[2:7] == ["prefix_tuning", "6", pirate.nth(4).inner_text(),
                                             "1", "private"]  # fmt: skip
    # The hostile description is text: no image element, no dialog.
    shanty = page.locator('tr[data-prefix="alice/shanty"] td.description')
    expect(shanty).to_have_text(HOSTILE)
    assert page.locator("#page img").count() == 0
    # Another tenant's public prefix can be exported, not deleted.
    expect(page.locator('tr[data-prefix="bob/bard"] button.danger')).to_have_count(0)
    assert page.evaluate("Object.keys(sessionStorage)") == ["prefix-server.api-key"]
    assert page.context.cookies() == []
    console.shot("prefixes")


def test_export_saves_the_zip(console: Console) -> None:
    page = console.page
    with page.expect_download() as download:
        page.click('tr[data-prefix="alice/pirate"] button:has-text("Export")')
    assert download.value.suggested_filename == "pirate-v1.zip"
    with zipfile.ZipFile(io.BytesIO(Path(download.value.path()).read_bytes())) as archive:
        assert sorted(archive.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_delete_takes_two_clicks(console: Console) -> None:
    page = console.page
    button = page.locator('tr[data-prefix="alice/shanty"] button.danger')
    button.click()
    expect(button).to_have_text("Confirm delete")
    button.click()
    expect(page.locator('tr[data-prefix="alice/shanty"]')).to_have_count(0)
    response = httpx.get(
        f"{console.live.url}/v1/prefixes/alice/shanty", headers=bearer(console.key)
    )
    assert response.status_code == 404


def test_visibility_changes_in_place(console: Console) -> None:
    page = console.page
    row = page.locator('tr[data-prefix="alice/pirate"]')
    before = row.locator("td").nth(6).inner_text()
    other = "public" if before == "private" else "private"
    row.locator("button.visibility").click()
    expect(page.locator('tr[data-prefix="alice/pirate"] td').nth(6)).to_have_text(other)
    got = httpx.get(f"{console.live.url}/v1/prefixes/alice/pirate", headers=bearer(console.key))
    assert got.json()["visibility"] == other
    page.locator('tr[data-prefix="alice/pirate"] button.visibility').click()  # and back
    expect(page.locator('tr[data-prefix="alice/pirate"] td').nth(6)).to_have_text(before)


def test_dropping_a_peft_folder_uploads_it(console: Console) -> None:
    page = console.page
    folder = console.adapters["pirate"]
    files = [
        [p.name, base64.b64encode(p.read_bytes()).decode()]
        for p in sorted(folder.iterdir())
        if p.suffix != ".md"
    ]
    # A real drop event carrying the folder's two files, as the browser makes one.
    transfer = page.evaluate_handle(
        """files => {
            const transfer = new DataTransfer();
            for (const [name, data] of files) {
                const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
                transfer.items.add(new File([bytes], name));
            }
            return transfer;
        }""",
        files,
    )
    page.dispatch_event("#up-drop", "drop", {"dataTransfer": transfer})
    expect(page.locator("#up-chosen li")).to_have_count(2)
    page.fill("#up-name", "dropped")
    page.fill("#up-description", "a dropped folder")
    page.click("#up-form button[type=submit]")
    row = page.locator('tr[data-prefix="alice/dropped"]')
    expect(row).to_have_count(1)
    expect(row.locator("td").nth(2)).to_have_text("prefix_tuning")
    expect(page.locator("#up-error")).to_have_text("")
    stored = httpx.get(
        f"{console.live.url}/v1/prefixes/alice/dropped", headers=bearer(console.key)
    ).json()
    pirate = httpx.get(
        f"{console.live.url}/v1/prefixes/alice/pirate", headers=bearer(console.key)
    ).json()
    assert stored["sha256"] == pirate["sha256"] and stored["visibility"] == "private"


def test_playground_streams_a_prefix_beside_the_base_model(console: Console) -> None:
    page = console.page
    page.click('nav a[data-page="playground"]')
    page.fill("#pg-prompt", "w3 w14 w15 w92")
    page.fill("#pg-max-tokens", "8")
    page.check('#pg-prefixes input[value="alice/pirate"]')
    page.click("#pg-run")
    columns = page.locator("#pg-columns .column")
    expect(columns).to_have_count(2)
    for i in range(2):
        expect(columns.nth(i)).to_have_attribute("data-done", "1")
    models = columns.evaluate_all("cs => cs.map(c => c.dataset.model)")
    assert models[1] == "alice/pirate"
    for i, model in enumerate(models):
        column = columns.nth(i)
        expected = httpx.post(
            f"{console.live.url}/v1/completions",
            json={"model": model, "prompt": "w3 w14 w15 w92", "max_tokens": 8, "temperature": 0},
            headers=bearer(console.key),
            timeout=60,
        ).json()["choices"][0]["text"]
        assert column.locator(".output").inner_text() == expected, model
        assert int(column.get_attribute("data-chunks") or 0) >= 8  # streamed, token by token
        title = column.locator(".token").first.get_attribute("title") or ""
        assert title.startswith("logprob -") and "top:" in title
    assert {page.locator("#pg-columns .column .state").nth(i).inner_text() for i in range(2)} == {
        "finished: length"
    }
    path = console.shot("playground")
    if os.environ.get("UPDATE_CONSOLE_IMAGES"):
        shutil.copy(path, IMAGES / "console-playground.png")


EXAMPLES = [{"prompt": f"w{i} w{i + 1}", "completion": f" w{i + 40} w{i + 41}"} for i in range(12)]


def jsonl(lines: list[object]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def points(page: Page) -> int:
    found = page.locator("#ft-detail svg.chart").get_attribute("data-points", timeout=10_000)
    return int(found or 0)


def start_job(page: Page, epochs: int, suffix: str) -> None:
    page.fill("#ft-tokens", "4")
    page.fill("#ft-epochs", str(epochs))
    page.fill("#ft-batch", "1")
    page.fill("#ft-suffix", suffix)
    page.click("#ft-start button[type=submit]")


def test_fine_tuning_uploads_trains_charts_and_cancels(console: Console, tmp_path: Path) -> None:
    page = console.page
    page.click('nav a[data-page="fine-tuning"]')
    # A bad line: the API's own message, naming the line, as text.
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl([EXAMPLES[0], {"prompt": "w1", "completion": HOSTILE, "weight": 1}]))
    page.set_input_files("#ft-file", str(bad))
    page.click("#ft-upload button[type=submit]")
    expect(page.locator("#ft-file-error")).to_contain_text("line 2")
    good = tmp_path / "train.jsonl"
    good.write_bytes(jsonl(EXAMPLES))
    page.set_input_files("#ft-file", str(good))
    page.click("#ft-upload button[type=submit]")
    expect(page.locator("#ft-training-file option")).to_have_count(1)
    expect(page.locator("#ft-file-error")).to_have_text("")

    # The transfer sources ranked on the uploaded file, equal to the API's own answer.
    page.click("#ft-rank-button")
    rows = page.locator("#ft-ranking tbody tr")
    expect(page.locator("#ft-ranking")).to_be_visible(timeout=60_000)
    file_id = page.locator("#ft-training-file").input_value()
    answer = httpx.post(
        f"{console.live.url}/v1/fine_tuning/transferability",
        json={"training_file": file_id, "sample_size": 8},
        headers=bearer(console.key),
        timeout=60,
    ).json()
    expected = [(c["prefix"], c["loss"]) for c in answer["data"]]
    expected.append((answer["model"], answer["base_loss"]))
    expected.sort(key=lambda pair: pair[1])
    assert "bob/poet" not in [name for name, _ in expected]
    shown = rows.evaluate_all("rs => rs.map(r => [r.dataset.model, r.cells[1].innerText])")
    assert [name for name, _ in shown] == [name for name, _ in expected]
    for (_, text), (_, loss) in zip(shown, expected, strict=True):
        assert abs(float(text) - loss) < 1e-4
    best = expected[0][0]
    page.locator(f'#ft-ranking tr[data-model="{best}"] button').click()
    assert page.locator("#ft-model").input_value() == best
    page.select_option("#ft-model", index=0)  # the jobs below start from the base model

    start_job(page, 20, "chart")  # 240 steps of one example: a few seconds on the tiny model
    status = page.locator("#ft-status")
    expect(status).to_have_text("running", timeout=30_000)
    seen = {points(page)}
    while status.inner_text() == "running":
        seen.add(points(page))
        page.wait_for_timeout(300)
    expect(status).to_have_text("succeeded")
    total = 12 * 20
    assert points(page) == total
    assert len(seen - {0, total}) >= 1, seen  # the chart gained points while the job ran
    assert page.locator("#ft-detail polyline.train").count() == 1
    assert "null" not in page.locator("#ft-detail").inner_text()
    path = console.shot("fine-tuning")
    if os.environ.get("UPDATE_CONSOLE_IMAGES"):
        shutil.copy(path, IMAGES / "console-fine-tuning.png")

    # A hostile suffix: the API's refusal quotes it, and the page shows that as text.
    start_job(page, 1, HOSTILE)
    expect(page.locator("#ft-job-error")).to_contain_text(f"found '{HOSTILE}'")
    assert page.locator("#page img").count() == 0

    start_job(page, 50, "stopped")
    expect(page.locator("#ft-detail h3")).to_contain_text("running", timeout=30_000)
    expect(page.locator("#ft-jobs tr.selected")).to_contain_text("stopped")
    page.click("#ft-cancel")
    expect(status).to_have_text("cancelled", timeout=30_000)
    assert page.locator("#ft-jobs tbody tr").count() >= 2
    assert page.locator("#page img").count() == 0


def test_ensembles_made_from_prefixes_answer_in_the_playground(console: Console) -> None:
    page = console.page
    page.click('nav a[data-page="ensembles"]')
    page.fill("#en-name", "duo")
    page.select_option("#en-method", "mean")
    page.fill("#en-description", HOSTILE)
    page.check('#en-prefixes input[value="alice/pirate"]')
    page.check('#en-prefixes input[value="bob/bard"]')
    page.click("#en-form button[type=submit]")
    row = page.locator('#en-table tr[data-ensemble="alice/duo"]')
    expect(row).to_have_count(1)
    expect(row.locator("td.description")).to_have_text(HOSTILE)
    expect(row.locator("td").nth(3)).to_have_text("alice/pirate, bob/bard")
    assert page.locator("#page img").count() == 0
    listed = httpx.get(f"{console.live.url}/v1/ensembles", headers=bearer(console.key)).json()
    assert [e["id"] for e in listed["data"]] == ["alice/duo"]
    console.shot("ensembles")

    # The ensemble as a playground column, streamed (a mean ensemble is one stream).
    page.click('nav a[data-page="playground"]')
    page.fill("#pg-prompt", "w3 w14 w15 w92")
    page.fill("#pg-max-tokens", "6")
    page.check('#pg-prefixes input[value="alice/duo"]')
    page.click("#pg-run")
    column = page.locator('#pg-columns .column[data-model="alice/duo"]')
    expect(column).to_have_attribute("data-done", "1")
    expect(column.locator(".state")).to_have_text("finished: length")
    expected = httpx.post(
        f"{console.live.url}/v1/completions",
        json={"model": "alice/duo", "prompt": "w3 w14 w15 w92", "max_tokens": 6, "temperature": 0},
        headers=bearer(console.key),
        timeout=60,
    ).json()["choices"][0]["text"]
    assert column.locator(".output").inner_text() == expected
    assert int(column.get_attribute("data-chunks") or 0) >= 6


def test_usage_charts_tokens_per_day_per_prefix(console: Console) -> None:
    page = console.page
    # bob uses his private prefix: alice's usage page must not show it.
    response = httpx.post(
        f"{console.live.url}/v1/completions",
        json={"model": "bob/poet", "prompt": "w1 w2", "max_tokens": 3},
        headers=bearer(console.live.keys["bob"]),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    page.wait_for_timeout(2500)  # usage is written every --usage-flush-interval (2 s)
    page.click('nav a[data-page="usage"]')
    expect(page.locator("#usage-table")).to_be_visible()
    report = httpx.get(
        f"{console.live.url}/v1/usage?group_by=day", headers=bearer(console.key)
    ).json()["data"]
    models = {r["model"] for r in report}
    assert {"alice/pirate", "alice/duo"} <= models and "bob/poet" not in models
    for r in report:
        tokens = r["prompt_tokens"] + r["completion_tokens"] + r["tuning_tokens"]
        if not tokens or r["model"] is None:
            continue
        bar = page.locator(f'#usage-chart rect.bar[data-series="{r["model"]}"]')
        expect(bar).to_have_count(1)
        assert bar.get_attribute("data-value") == str(tokens)
        cells = page.locator(f'#usage-table tr[data-model="{r["model"]}"] td')
        assert cells.nth(7).inner_text() == str(tokens)  # the value as text too
    assert "bob/poet" not in page.locator("#page").inner_text()
    console.shot("usage")


def test_keys_issue_once_and_revoke(console: Console) -> None:
    page = console.page
    page.click('nav a[data-page="keys"]')
    expect(page.locator("#key-tenant")).to_have_text("alice")
    rows = page.locator("#key-table tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first.locator(".key-state")).to_have_text("active (this console's)")
    expect(rows.first.locator("button.danger")).to_have_count(0)  # not the key in use
    page.click("#key-issue")
    expect(rows).to_have_count(2)
    secret = page.locator("#key-secret").input_value()
    console.issued.append(secret)
    url = f"{console.live.url}/v1/models"
    assert httpx.get(url, headers=bearer(secret)).status_code == 200
    console.shot("keys")
    page.click("#key-issued button:has-text('Done')")
    expect(page.locator("#key-secret")).to_have_count(0)  # shown once
    assert secret not in page.locator("#page").inner_text()
    revoke = rows.nth(1).locator("button.danger")
    revoke.click()
    expect(revoke).to_have_text("Confirm revoke")
    revoke.click()
    expect(rows.nth(1).locator(".key-state")).to_have_text("revoked")
    assert httpx.get(url, headers=bearer(secret)).status_code == 401
    assert httpx.get(url, headers=bearer(console.key)).status_code == 200


def test_admin_signs_in_to_the_operator_page(console: Console) -> None:
    page = console.page
    page.click("#sign-out")
    page.fill("#api-key", ADMIN)
    page.click("#sign-in-form button")
    expect(page.locator("#page")).to_have_attribute("data-page", "operator")
    expect(page.locator('nav a[data-page="prefixes"]')).to_be_hidden()
    tenants = page.locator("#op-tenants tbody tr")
    expect(tenants).to_have_count(2)
    assert tenants.evaluate_all("rs => rs.map(r => r.dataset.tenant)") == ["alice", "bob"]
    page.click('#op-tenants tr[data-tenant="alice"] button')
    expect(page.locator("#op-tenant")).to_have_text("alice")
    rpm = page.locator('#op-quotas tr[data-field="requests_per_minute"] td.num')
    before = httpx.get(f"{console.live.url}/v1/tenants/alice", headers=bearer(ADMIN)).json()
    expect(rpm).to_have_text(str(before["rate_limits"]["requests_per_minute"]))
    page.fill("#op-requests_per_minute", "1234")
    page.fill("#op-max_prefixes", "50")
    page.click("#op-limits button[type=submit]")
    expect(rpm).to_have_text("1234")
    expect(page.locator('#op-quotas tr[data-field="max_prefixes"] td.num')).to_have_text("50")
    info = httpx.get(f"{console.live.url}/v1/tenants/alice", headers=bearer(ADMIN)).json()
    assert info["rate_limits"]["requests_per_minute"] == 1234
    assert info["quotas"]["max_prefixes"] == 50
    # A number the form cannot read is refused in place, naming the field: never sent (JSON
    # would carry it as null, which means "the default again").
    for typed in ("1,000", "9" * 400):  # NaN, and Infinity: each would be sent as null
        page.fill("#op-requests_per_minute", typed)
        page.fill("#op-max_prefixes", "60")
        page.click("#op-limits button[type=submit]")
        expect(page.locator("#op-error")).to_contain_text("Requests per minute")
        expect(page.locator("#op-error")).to_contain_text(typed)
    expect(rpm).to_have_text("1234")
    info = httpx.get(f"{console.live.url}/v1/tenants/alice", headers=bearer(ADMIN)).json()
    assert info["rate_limits"]["requests_per_minute"] == 1234
    assert info["quotas"]["max_prefixes"] == 50
    expect(page.locator("#op-detail #key-table tbody tr")).to_have_count(2)  # one revoked
    # The engine's figures from /metrics: the earlier tests' generations counted, and the chart
    # gains a point every poll.
    generated = page.locator('#op-engine-figures tr[data-figure="generated"] td.num')
    expect(generated).not_to_have_text("—")
    assert int(generated.inner_text()) > 0
    chart = page.locator("#op-engine-chart svg.chart")
    page.wait_for_function(
        "() => Number(document.querySelector('#op-engine-chart svg.chart')"
        "?.dataset.points || 0) >= 2",
        timeout=15_000,
    )
    assert chart.locator("polyline.train").count() == 1
    expect(page.locator('#op-engine-figures tr[data-figure="queue"] td.num')).to_have_text("0")
    console.shot("operator")
    # A tenant that has used nothing is looked up by name; an unknown one is said so.
    page.fill("#op-lookup", "nobody")
    page.click("#op-find button[type=submit]")
    expect(page.locator("#op-status")).to_have_text("tenant 'nobody' does not exist")
    # The admin's usage page: every tenant's.
    page.click('nav a[data-page="usage"]')
    expect(page.locator("#usage-table")).to_be_visible()
    assert "bob/poet" in page.locator("#usage-table").inner_text()


def test_nothing_leaked_and_no_script_ran(console: Console) -> None:
    """Runs last: over everything the earlier tests did in the browser."""
    assert console.dialogs == []
    # The expected refusals (the wrong key's 401, the bad file's and the bad suffix's 400) are
    # the only errors; a CSP violation ("Refused to ...") or a script error would show here.
    refused = "Failed to load resource: the server responded with a status of "
    statuses = sorted(e.removeprefix(refused)[:3] for e in console.errors if e.startswith(refused))
    assert statuses == ["400", "400", "401", "404"] and len(console.errors) == 4, console.errors
    assert console.urls, "no request seen"
    secrets = [console.key, ADMIN, *console.issued]
    assert not [u for u in console.urls if any(s in u for s in secrets)]
    console.page.click("#sign-out")
    assert console.page.evaluate("sessionStorage.length") == 0
    log = console.live.server.log.read_text()
    assert '"route": "/v1/completions"' in log  # the log is the server's access log
    assert not [s for s in secrets if s in log]
